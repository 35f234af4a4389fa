"""The benchmark's models by name and :class:`BenchConfig`, the settings of a run (all but its methods)."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist

from pycomm.bench.models import ByteMLP, CharTransformer, ModelConfig
from pycomm.bench.netns import parse_rate

__all__ = ["ModelSpec", "MODELS", "HIERARCHIES", "PARALLELS", "SGD_LR", "SPSA_LR", "SPSA_EPS", "BenchConfig"]


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and how to train it.

    Attributes:
        description: one line for reports.
        build: ``build() -> nn.Module`` (picklable); the module has
            ``loss_from_logits(logits, targets)`` and ``correct(logits, targets)``
            (see :mod:`pycomm.bench.models`).
        context: bytes per training sequence.
        batch_size: default sequences per worker per step.
        learning_rates: peak learning rate for each optimizer of :data:`OPTIMIZERS`. ``large``: AdamW 1e-4
            (3e-4 and 1e-3 diverged within 5-10 steps at 4 x 32 sequences per step), SGD 0.05 (clipped at 1.0).
    """

    description: str
    build: Callable[[], torch.nn.Module]
    context: int
    batch_size: int
    learning_rates: Mapping[str, float]


#: Values of :attr:`BenchConfig.hierarchy` (the hooks' ``hierarchy=`` argument).
HIERARCHIES: tuple[str, ...] = ("flat", "node", "auto")

#: Values of :attr:`BenchConfig.parallel`: how the model is replicated or sharded across the workers.
PARALLELS: tuple[str, ...] = ("ddp", "fsdp", "hsdp")

#: Peak learning rate of the SGD methods on the ``lm`` model (``allreduce-sgd`` and ``dgc``), tuned for
#: allreduce-sgd on the former demo run (200 steps, 4 workers, clipping at 1.0).
SGD_LR: float = 0.1
#: Peak learning rate and perturbation scale of the ``spsa`` row on ``lm``: lr 2e-3 .. 1e-2 all train
#: (3e-3 .. 7e-3 about equally well), eps 1e-2 was worse than 1e-3.
SPSA_LR: float = 5e-3
SPSA_EPS: float = 1e-3

_LM_CONFIG = ModelConfig(context=64, n_layer=2, n_head=4, d_model=128)

#: The benchmark's models by name.
MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "lm": ModelSpec(
            description="byte-level transformer LM (pycomm.bench.models.CharTransformer, 2 layers, d_model 128)",
            build=functools.partial(CharTransformer, _LM_CONFIG),
            context=_LM_CONFIG.context,
            batch_size=16,
            learning_rates=MappingProxyType({"adamw": 3e-3, "sgd-momentum": SGD_LR, "sgd": SGD_LR, "spsa": SPSA_LR}),
        ),
        "large": ModelSpec(
            description="communication-heavy next-byte MLP (pycomm.bench.models.ByteMLP, 32x64 inputs, "
            "hidden 4096x4096)",
            build=ByteMLP,
            context=32,
            batch_size=32,
            learning_rates=MappingProxyType({"adamw": 1e-4, "sgd-momentum": 0.05, "sgd": 0.05, "spsa": 1e-4}),
        ),
    }
)


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run except the methods.

    Attributes:
        workers: DDP processes.
        steps: optimizer steps per method.
        model: a name in :data:`MODELS`.
        batch_size: sequences per worker per step; None: the model's default.
        warmup_steps: learning-rate warm-up length; None: 10% of ``steps``.
        weight_decay: weight decay of every optimizer.
        grad_clip: gradient-norm clipping threshold (0 disables); methods with
            :attr:`MethodSpec.clip_in_hook` pass it to their hook instead.
        bucket_cap_mb: DDP bucket size; None keeps DDP's default.
        seed: seeds the initial weights (same for all methods) and the data (``seed + rank``).
        corpus_bytes: size of the stdlib-source corpus.
        eval_batches: held-out batches (split across workers).
        eval_batch_size: sequences per held-out batch.
        final_window: the final loss averages this many last steps; None: ``max(1, min(10, steps // 5))``.
        backend: ``"gloo"``, ``"nccl"`` (one GPU per rank) or ``"auto"`` (NCCL when
            CUDA has a GPU per worker, else Gloo).
        bandwidth: link rate in tc syntax (``"100mbit"``, ``"1gbit"``); None: unshaped.
        delay: per-packet delay in tc syntax (``"1ms"``), applied where the kernel has netem.
        shape: shape the link when ``bandwidth`` is set and shaping is allowed;
            False runs unshaped and only estimates the link time.
        start_timeout_s: longest wait for a method's first step (process start, rendezvous, first step).
        stall_timeout_s: a method is killed and reported failed when no step finishes for
            ``max(stall_timeout_s, 3 x its mean step time so far)``.
        gloo_threads: worker threads of each Gloo process group; None keeps PyTorch's default (2).
        nodes: emulate this many nodes (:class:`pycomm.bench.node_network.EmulatedNodes`, root on Linux), each
            running ``workers // nodes`` processes under ``torchrun``; ``bandwidth`` and ``delay`` then shape each
            node's uplink. None: all workers on one machine, as before.
        hierarchy: passed as ``hierarchy=<value>`` to every pycomm method's ``pycomm.register`` (``"flat"``,
            ``"node"`` or ``"auto"``); None passes nothing (the method's default). PyTorch's own hooks ignore it.
        parallel: ``"ddp"`` (a full replica per worker, DDP), ``"fsdp"`` (FSDP2 ``fully_shard`` over all
            workers) or ``"hsdp"`` (``replicas`` replicas, each sharded over ``workers // replicas`` workers);
            every method of a run must be of this kind (:attr:`MethodSpec.parallel`).
        replicas: replicas of an ``"hsdp"`` run (at least 2, dividing ``workers`` into shard groups of at
            least 2); None: ``nodes`` when emulating nodes, else 2. Only for ``"hsdp"``.
        steady_state: a short run that times a method's steady step (``pycomm bench tta``'s timing runs):
            methods with a schedule (L-GreCo's solves) finish it before the timed steps' median instead
            of scaling it to the run's length.
    """

    workers: int = 4
    steps: int = 50
    model: str = "lm"
    batch_size: Optional[int] = None
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bucket_cap_mb: Optional[float] = None
    seed: int = 0
    corpus_bytes: int = 2_000_000
    eval_batches: int = 8
    eval_batch_size: int = 32
    final_window: Optional[int] = None
    backend: str = "auto"
    bandwidth: Optional[str] = None
    delay: Optional[str] = None
    shape: bool = True
    start_timeout_s: float = 300.0
    stall_timeout_s: float = 60.0
    gloo_threads: Optional[int] = None
    nodes: Optional[int] = None
    hierarchy: Optional[str] = None
    parallel: str = "ddp"
    replicas: Optional[int] = None
    steady_state: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.bandwidth is not None:
            parse_rate(self.bandwidth)
        if self.start_timeout_s <= 0 or self.stall_timeout_s <= 0:
            raise ValueError("start_timeout_s and stall_timeout_s must be positive")
        if self.nodes is not None and (self.nodes < 1 or self.workers % self.nodes != 0):
            raise ValueError(f"nodes must be >= 1 and divide workers (each node runs workers // nodes processes), "
                             f"got nodes={self.nodes}, workers={self.workers}")
        if self.hierarchy is not None and self.hierarchy not in HIERARCHIES:
            raise ValueError(f"hierarchy must be one of {', '.join(HIERARCHIES)} or None, got {self.hierarchy!r}")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel must be one of {', '.join(PARALLELS)}, got {self.parallel!r}")
        if self.parallel != "ddp" and self.hierarchy is not None:
            raise ValueError(f"hierarchy is an option of the DDP hooks (pycomm.register), not of parallel="
                             f"{self.parallel!r}")
        if self.parallel != "hsdp":
            if self.replicas is not None:
                raise ValueError(f"replicas is for parallel='hsdp', got replicas={self.replicas} with parallel="
                                 f"{self.parallel!r}")
        elif self.hsdp_replicas < 2 or self.workers % self.hsdp_replicas or self.workers // self.hsdp_replicas < 2:
            raise ValueError(f"parallel='hsdp' needs the {self.workers} workers to divide into replicas x shards "
                             f"with at least 2 of each (replicas={self.hsdp_replicas} gives "
                             f"{self.workers / self.hsdp_replicas:g} shards); e.g. 4 workers as 2 x 2: use "
                             "parallel='fsdp' for one replica, 'ddp' for one worker per replica")

    @property
    def model_spec(self) -> ModelSpec:
        """The :class:`ModelSpec` of :attr:`model`."""
        return MODELS[self.model]

    @property
    def nproc_per_node(self) -> int:
        """Processes per (emulated) node: ``workers // nodes``, or ``workers`` on one machine."""
        return self.workers // (self.nodes or 1)

    @property
    def hsdp_replicas(self) -> int:
        """Replicas of an HSDP run: :attr:`replicas`, else :attr:`nodes` when emulating nodes, else 2."""
        if self.replicas is not None:
            return self.replicas
        return self.nodes if self.nodes is not None else 2

    @property
    def batch(self) -> int:
        """Effective sequences per worker per step."""
        return self.batch_size if self.batch_size is not None else self.model_spec.batch_size

    @property
    def lr(self) -> float:
        """The model's AdamW peak learning rate (the methods without an optimizer of their own)."""
        return self.model_spec.learning_rates["adamw"]

    @property
    def warmup(self) -> int:
        """Effective warm-up length in steps."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    @property
    def window(self) -> int:
        """Effective number of final steps averaged for the final loss."""
        return self.final_window if self.final_window is not None else max(1, min(10, self.steps // 5))

    @property
    def resolved_backend(self) -> str:
        """``gloo`` or ``nccl``: what ``backend="auto"`` means here.

        With :attr:`nodes` it is always ``gloo`` (see the error below).

        Raises:
            ValueError: ``backend="nccl"`` on a machine without NCCL or with fewer CUDA GPUs than
                workers (NCCL cannot put two ranks on one GPU: rank r would share GPU r % count),
                or with :attr:`nodes` (NCCL would bypass the emulated uplinks).
        """
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.nodes is not None:
            # NCCL sees one host and would join the emulated nodes' GPUs over NVLink or shared memory, not the
            # shaped uplinks: the emulation measures Gloo over the veths
            if self.backend == "nccl":
                raise ValueError("backend='nccl' with emulated nodes: NCCL would connect the GPUs of one machine "
                                 "directly (NVLink, PCIe, shared memory), bypassing the shaped node uplinks; use "
                                 "backend='gloo' (or 'auto', which picks Gloo with nodes)")
            return "gloo"
        if self.backend == "nccl":
            if not dist.is_nccl_available():
                raise ValueError("backend='nccl' needs a torch built with NCCL; this one has none "
                                 "(use backend='gloo' or 'auto')")
            if gpus < self.workers:
                raise ValueError(f"backend='nccl' needs one CUDA GPU per worker: workers={self.workers} but this "
                                 f"machine has {gpus} GPU(s), and NCCL cannot run two ranks on one GPU; use "
                                 f"workers <= {gpus} or backend='gloo' (or 'auto', which picks Gloo here)")
            return "nccl"
        if self.backend != "auto":
            return self.backend
        return "nccl" if gpus >= self.workers and dist.is_nccl_available() else "gloo"

    def lr_scale(self, step: int) -> float:
        """Schedule of ``step`` (0-based) as a fraction of the peak: linear warm-up, then cosine to 0.1."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        """AdamW learning rate of ``step`` (0-based)."""
        return self.lr * self.lr_scale(step)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-friendly dict."""
        return asdict(self)

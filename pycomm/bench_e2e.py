"""End-to-end benchmark: train a model with DDP under each gradient-communication method, over a shaped link.

``pycomm bench e2e`` (also ``python -m pycomm.bench_e2e``, and ``pycomm demo``
with the demo's defaults) answers one question per row: on this link, with this
model, how fast does a step run, how many bytes does each worker send, and how
far does the loss get?

How a run works
---------------
* The harness starts one launcher (``python -m pycomm.bench_e2e --launch SPEC``,
  in a new session) that forks ``workers`` processes (Gloo on CPU; NCCL with
  one GPU per rank where CUDA is available and ``backend`` asks for it); they
  run the methods one after the other, each in a process group of its own
  making (DDP, hook, optimizer). A method whose workers crash is reported as
  failed with the exception; one whose workers stop making progress
  (``stall_timeout_s`` without a step, e.g. a hook that deadlocks) is killed,
  with the launcher's whole process group, and reported as failed; a fresh
  launcher then runs the remaining methods. A method that needs a pycomm method not registered in this build (see
  :func:`pycomm.available_methods`) is reported as unavailable.
* With ``bandwidth`` set and shaping allowed (root on Linux), all workers run
  inside one network namespace whose loopback is shaped by tc
  (:class:`pycomm.netns.ShapedNamespace`): the rate is shared by all workers.
  The namespace is removed at the end, on errors and on Ctrl-C/SIGTERM too.
  Where shaping is not allowed the run is unshaped, the table says so, and the
  column ``est. link s/step`` gives the time the counted bytes would take on
  such a shared link (``W * bytes/worker/step * 8 / rate``).
* Every method trains the same model from the same initial weights on the same
  batches for ``steps`` steps with its own optimizer (:attr:`MethodSpec.optimizer`),
  at the model's learning rate for that optimizer (:attr:`ModelSpec.learning_rates`).

What is measured, per method
----------------------------
* ``step_time_s``: median over steps of the slowest rank's step time (forward,
  backward with the hook's communication, optimizer step).
* ``bytes_per_worker_per_step``: counted at the process-group level by
  :class:`pycomm.traffic.CollectiveByteCounter` from the tensors each collective
  really sends (ring all-reduce ``2(W-1)/W`` of the input, all-gather ``W-1``
  times, ...): median over steps of the mean over ranks, i.e. the steady state
  (compressing methods all-reduce uncompressed for their first steps).
* ``wire_bytes_per_worker_per_step`` (shaped runs only): the bytes that really
  crossed the namespace's loopback (``/sys/class/net/lo/statistics/tx_bytes``,
  read by rank 0 before the loop and after every step, divided by workers):
  median over steps, like the counted bytes, so the two differ by the TCP/IP
  and Gloo overhead; ``mean_wire_bytes_per_worker_per_step`` is the whole
  loop's total over workers and steps (compare it with
  ``mean_bytes_per_worker_per_step``).
* ``compression_ratio``: an fp32 ring all-reduce's bytes over the counted bytes.
* ``final_loss``: mean training loss of the last ``final_window`` steps (mean
  over ranks); ``eval_loss`` and ``eval_accuracy`` (next-byte top-1) on a fixed
  held-out set.

Example::

    results = run_e2e(["allreduce", "quant4"], BenchConfig(workers=2, steps=20, bandwidth="1gbit"))
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pickle
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TextIO, Union

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook, quantization_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from pycomm.data import Corpus, eval_batches, load_corpus, train_batch, train_generator
from pycomm.models import ByteMLP, CharTransformer, ModelConfig
from pycomm.netns import ShapedNamespace, parse_rate, read_tx_bytes, shaping_unavailable_reason
from pycomm.traffic import CollectiveByteCounter

__all__ = [
    "OPTIMIZERS",
    "ModelSpec",
    "MODELS",
    "MethodSpec",
    "torch_hook",
    "powersgd_method",
    "pycomm_method",
    "spsa_method",
    "METHODS",
    "DEFAULT_METHODS",
    "BenchConfig",
    "fp32_allreduce_bytes",
    "run_e2e",
    "format_table",
    "write_plots",
    "main",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and how to train it.

    Attributes:
        description: one line for reports.
        build: ``build() -> nn.Module`` (picklable); the module has
            ``loss_from_logits(logits, targets)`` and ``correct(logits, targets)``
            (see :mod:`pycomm.models`).
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
            description="byte-level transformer LM (pycomm.models.CharTransformer, 2 layers, d_model 128)",
            build=functools.partial(CharTransformer, _LM_CONFIG),
            context=_LM_CONFIG.context,
            batch_size=16,
            learning_rates=MappingProxyType({"adamw": 3e-3, "sgd-momentum": SGD_LR, "sgd": SGD_LR, "spsa": SPSA_LR}),
        ),
        "large": ModelSpec(
            description="communication-heavy next-byte MLP (pycomm.models.ByteMLP, 32x64 inputs, hidden 4096x4096)",
            build=ByteMLP,
            context=32,
            batch_size=32,
            learning_rates=MappingProxyType({"adamw": 1e-4, "sgd-momentum": 0.05, "sgd": 0.05, "spsa": 1e-4}),
        ),
    }
)


# --------------------------------------------------------------------------- methods

#: Optimizer names a :class:`MethodSpec` may choose (weight decay ``BenchConfig.weight_decay``, applied locally):
#:
#: * ``"adamw"``: ``AdamW(betas=(0.9, 0.95))``,
#: * ``"sgd-momentum"``: ``SGD(momentum=0.9)``,
#: * ``"sgd"``: ``SGD(momentum=0)``, for methods whose hook applies momentum itself (DGC),
#: * ``"spsa"``: :class:`pycomm.zo.SPSA` (zeroth order, no weight decay); it replaces DDP and the backward pass.
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd-momentum", "sgd", "spsa")


@dataclass(frozen=True)
class MethodSpec:
    """How to attach one gradient-communication method to a DDP model, and how to train it.

    Attributes:
        attach: ``attach(ddp_model, config)`` on every rank right after DDP
            construction; registers the communication hook and returns its
            state (kept alive for the run) or None. Picklable (a module-level
            function or a :func:`functools.partial` of one). None for the
            ``"spsa"`` optimizer, which trains without DDP.
        description: one line for reports.
        needs_pycomm: whether it needs ``pycomm.register``.
        pycomm_name: the :func:`pycomm.available_methods` name it needs, if any;
            the method is reported as unavailable when that name is missing.
        optimizer: one of :data:`OPTIMIZERS`.
        lr: peak learning rate; None means the model's rate for the optimizer
            (:attr:`ModelSpec.learning_rates`). The schedule has the shape of
            :meth:`BenchConfig.lr_scale`.
        clip_in_hook: the hook clips the gradients itself (DGC's local
            clipping), so the loop does not clip after the backward pass.
        eps: perturbation scale of the ``"spsa"`` optimizer (unused by the others).
    """

    attach: Optional[Callable[[DDP, "BenchConfig"], Any]]
    description: str
    needs_pycomm: bool = False
    pycomm_name: Optional[str] = None
    optimizer: str = "adamw"
    lr: Optional[float] = None
    clip_in_hook: bool = False
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive or None, got {self.lr}")
        if self.zeroth_order != (self.attach is None):
            raise ValueError("attach must be None exactly when the optimizer is 'spsa' (no DDP, no hook)")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")

    @property
    def zeroth_order(self) -> bool:
        """Whether this method trains with :class:`pycomm.zo.SPSA` (no DDP, no backward pass)."""
        return self.optimizer == "spsa"

    def base_lr(self, cfg: "BenchConfig") -> float:
        """The peak learning rate of this method under ``cfg``."""
        return self.lr if self.lr is not None else cfg.model_spec.learning_rates[self.optimizer]

    def lr_at(self, cfg: "BenchConfig", step: int) -> float:
        """The learning rate of ``step``: ``cfg``'s schedule shape scaled to :meth:`base_lr`."""
        return self.base_lr(cfg) * cfg.lr_scale(step)

    def make_optimizer(self, params: Union[torch.nn.Module, Iterable[torch.nn.Parameter]], cfg: "BenchConfig") -> Any:
        """The optimizer this method trains with (see :data:`OPTIMIZERS`).

        ``params`` may be the model itself; the ``"spsa"`` optimizer prefers it
        and is seeded with ``cfg.seed`` on every rank.
        """
        lr = self.base_lr(cfg)
        if self.zeroth_order:
            from pycomm.zo import SPSA

            return SPSA(params, lr=lr, eps=self.eps, seed=cfg.seed)
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        momentum = 0.9 if self.optimizer == "sgd-momentum" else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)


def _attach_torch_hook(hook: Callable[..., Any], ddp: DDP, cfg: "BenchConfig") -> None:
    ddp.register_comm_hook(state=None, hook=hook)
    return None


def _attach_powersgd(rank: int, ddp: DDP, cfg: "BenchConfig") -> Any:
    # compression from iteration 2 (the earliest PyTorch allows with error feedback), not its default 1000
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                        random_seed=cfg.seed)
    ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return state


def _attach_pycomm(name: str, kwargs: Mapping[str, Any],
                   config_options: Optional[Callable[["BenchConfig"], Mapping[str, Any]]],
                   ddp: DDP, cfg: "BenchConfig") -> Any:
    import pycomm

    options = dict(kwargs)
    if config_options is not None:
        options.update(config_options(cfg))
    return pycomm.register(ddp, name, **options)


def torch_hook(hook: Callable[..., Any], description: Optional[str] = None, *, optimizer: str = "adamw",
               lr: Optional[float] = None) -> MethodSpec:
    """A method that registers a PyTorch DDP communication hook with ``state=None`` (the default group).

    Args:
        hook: a hook such as ``default_hooks.allreduce_hook``.
        description: report text; defaults to the hook's name.
        optimizer, lr: see :class:`MethodSpec`.
    """
    return MethodSpec(attach=functools.partial(_attach_torch_hook, hook),
                      description=description or f"torch {hook.__name__}", optimizer=optimizer, lr=lr)


def powersgd_method(rank: int) -> MethodSpec:
    """PyTorch's ``powerSGD_hook`` at ``matrix_approximation_rank=rank``, compressing from iteration 2."""
    return MethodSpec(attach=functools.partial(_attach_powersgd, rank),
                      description=f"torch powerSGD_hook(rank={rank}, start_powerSGD_iter=2)")


def pycomm_method(name: str, *, config_options: Optional[Callable[["BenchConfig"], Mapping[str, Any]]] = None,
                  description: Optional[str] = None, **kwargs: Any) -> MethodSpec:
    """A method that calls ``pycomm.register(ddp_model, name, **kwargs)``.

    Choose the optimizer with :func:`dataclasses.replace` on the result, e.g.
    ``replace(pycomm_method("dgc"), optimizer="sgd", clip_in_hook=True)``.

    Args:
        name: the pycomm method name, e.g. ``"quant"``.
        config_options: options that depend on the run, as a picklable
            ``config_options(config) -> dict`` (they override ``kwargs``).
        description: report text; defaults to the name and options.
        **kwargs: its options, e.g. ``bits=4``.
    """
    options = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return MethodSpec(attach=functools.partial(_attach_pycomm, name, dict(kwargs), config_options),
                      description=description or f"pycomm {name}({options})", needs_pycomm=True, pycomm_name=name)


def spsa_method(eps: float, lr: Optional[float] = None, description: Optional[str] = None) -> MethodSpec:
    """A zeroth-order method: :class:`pycomm.zo.SPSA` with one byte per worker per step.

    It trains the plain model (no DDP, no hook, no backward pass; the replicas
    start from rank 0's weights via ``SPSA.sync``) with perturbation scale
    ``eps``, at ``lr`` or the model's SPSA learning rate.
    """
    return MethodSpec(attach=None, needs_pycomm=True, optimizer="spsa", lr=lr, eps=eps,
                      description=description
                      or f"pycomm.zo.SPSA(eps={eps:g}), zeroth order, one byte per rank per step")


#: Directions (bytes per bucket per rank) of the ``spsa-projection`` row (AdamW; on the lm demo run AdamW 3e-3
#: beat 1e-3, 1e-2 and K=4). It uses the hook's default, no error feedback: with it the residual becomes a running
#: sum of stale gradients (final train loss 4.03 against 3.71 without; see :class:`pycomm.hooks.ProjectionState`).
PROJECTION_DIRECTIONS: int = 8

#: Fraction of the run that DGC's density warm-up spans (the paper: 4 of ~90 epochs).
DGC_WARMUP_FRACTION: float = 0.12


def _dgc_options(cfg: "BenchConfig") -> dict[str, Any]:
    """DGC options that follow the run: the paper's density warm-up (4 stages, 25% .. 0.4%) over the first ~12%
    of the steps, and local clipping at the run's threshold (scaled by ``W^-1/2`` in the hook). Runs shorter
    than 17 steps get no warm-up: 4 stages of at least one step would be most of such a run, and its medians
    would measure the warm-up instead of DGC."""
    from pycomm.hooks.dgc import PAPER_WARMUP_DENSITIES

    stage = round(cfg.steps * DGC_WARMUP_FRACTION / len(PAPER_WARMUP_DENSITIES))
    return {"warmup_steps": stage, "clip_norm": cfg.grad_clip if cfg.grad_clip > 0 else None}


def _lgreco_options(cfg: "BenchConfig") -> dict[str, Any]:
    """L-GreCo's schedule scaled to the run (its defaults, a first solve at step 1000 and one per 1000 steps,
    would never solve in a benchmark): the uniform default until ~20% of the steps, then a solve every ~25%,
    each on the gradients of the last ``min(10, steps // 10)`` steps."""
    acc_steps = max(1, min(10, cfg.steps // 10))
    return {"acc_steps": acc_steps, "start_iter": max(acc_steps + 2, cfg.steps // 5),
            "period": max(acc_steps, cfg.steps // 4)}


def _lgreco_topk_options(cfg: "BenchConfig") -> dict[str, Any]:
    """:func:`_lgreco_options` plus DGC's run-dependent options (its inner state is DGC's)."""
    return {**_dgc_options(cfg), **_lgreco_options(cfg)}


#: Method name -> :class:`MethodSpec`: the one table behind ``pycomm bench e2e`` and ``pycomm demo``.
METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        "allreduce": torch_hook(default_hooks.allreduce_hook,
                                "fp32 ring all-reduce (torch allreduce_hook), DDP default"),
        "fp16": torch_hook(default_hooks.fp16_compress_hook, "fp16 all-reduce (torch fp16_compress_hook)"),
        "powersgd1": powersgd_method(1),
        "powersgd4": powersgd_method(4),
        "torch-quant": torch_hook(quantization_hooks.quantization_perchannel_hook,
                                  "torch quantization_perchannel_hook (uint8, all-gather)"),
        "quant8": pycomm_method("quant", bits=8),
        "quant4": pycomm_method("quant", bits=4),
        "quant2": pycomm_method("quant", bits=2),
        # the SGD pair: the dense baseline with optimizer momentum, and DGC with its momentum in the hook
        "allreduce-sgd": torch_hook(default_hooks.allreduce_hook,
                                    "fp32 ring all-reduce (torch allreduce_hook), SGD momentum 0.9",
                                    optimizer="sgd-momentum"),
        "dgc": replace(
            pycomm_method("dgc", density=0.001, momentum=0.9, config_options=_dgc_options,
                          description="pycomm dgc(density=0.001, momentum=0.9), warm-up over ~12% of steps, "
                          "local clipping; SGD momentum 0"),
            optimizer="sgd", clip_in_hook=True),
        "lgreco-quant": pycomm_method("lgreco", family="quant", config_options=_lgreco_options,
                                      description="pycomm lgreco(family='quant'): per-layer bits around 4, "
                                      "schedule scaled to the run; AdamW"),
        "lgreco-topk": replace(
            pycomm_method("lgreco", family="topk", momentum=0.9, config_options=_lgreco_topk_options,
                          description="pycomm lgreco(family='topk'): per-layer DGC densities around the default, "
                          "schedule scaled to the run; SGD momentum 0 (momentum in the hook)"),
            optimizer="sgd", clip_in_hook=True),
        "spsa-projection": pycomm_method("spsa-projection", num_directions=PROJECTION_DIRECTIONS,
                                         description=f"pycomm spsa-projection(num_directions={PROJECTION_DIRECTIONS}),"
                                         " no error feedback (the hook's default); AdamW"),
        "spsa": spsa_method(SPSA_EPS),
    }
)

#: Methods of ``pycomm bench e2e`` when none are named (the issue's comparison).
DEFAULT_METHODS: tuple[str, ...] = (
    "allreduce", "fp16", "powersgd1", "powersgd4", "torch-quant", "quant8", "quant4", "quant2", "dgc",
    "lgreco-quant", "lgreco-topk", "spsa-projection",
)


# --------------------------------------------------------------------------- config


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

    @property
    def model_spec(self) -> ModelSpec:
        """The :class:`ModelSpec` of :attr:`model`."""
        return MODELS[self.model]

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

        Raises:
            ValueError: ``backend="nccl"`` on a machine without NCCL or with fewer CUDA GPUs than
                workers (NCCL cannot put two ranks on one GPU: rank r would share GPU r % count).
        """
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
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


def fp32_allreduce_bytes(model: torch.nn.Module, workers: int) -> int:
    """Bytes one worker sends per step in an fp32 ring all-reduce of all gradients (``2(W-1)/W`` of them)."""
    return sum(2 * (workers - 1) * p.numel() * 4 // workers for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- worker side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _param_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() + p.double().sum() for p in model.parameters()))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _train_one(name: str, spec: MethodSpec, cfg: BenchConfig, corpus: Corpus,
               eval_set: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world: int,
               device: torch.device, progress: Optional[Callable[[int, float], None]],
               measure_wire: bool) -> Optional[dict[str, Any]]:
    """Train one method on this rank; return the merged result on rank 0 (None elsewhere)."""
    torch.manual_seed(cfg.seed)
    model = cfg.model_spec.build().to(device)
    fp32_bytes = fp32_allreduce_bytes(model, world)
    if spec.zeroth_order:
        ddp, state = None, None
        optimizer = spec.make_optimizer(model, cfg)
        optimizer.sync(src=0)  # same weights everywhere (they already are: same seed), outside the counter
    else:
        ddp = DDP(model, bucket_cap_mb=cfg.bucket_cap_mb)
        state = spec.attach(ddp, cfg)
        optimizer = spec.make_optimizer(model.parameters(), cfg)
    clip = cfg.grad_clip if cfg.grad_clip > 0 and not spec.clip_in_hook else 0.0
    generator = train_generator(cfg.seed, rank)
    counter = CollectiveByteCounter()

    losses: list[float] = []
    step_bytes: list[int] = []
    step_calls: list[int] = []
    step_times: list[float] = []
    dist.barrier()
    tx_marks = [read_tx_bytes()] if measure_wire and rank == 0 else []
    wall_start = time.perf_counter()
    for step in range(cfg.steps):
        inputs, targets = train_batch(corpus, cfg.batch, cfg.model_spec.context, generator)
        inputs, targets = inputs.to(device), targets.to(device)
        if spec.zeroth_order:
            optimizer.lr = spec.lr_at(cfg, step)
            start = time.perf_counter()
            counter.reset()
            with counter:  # two perturbed forwards (no_grad) and one all_gather of one byte
                loss_value = optimizer.step(functools.partial(model.loss, inputs, targets))
        else:
            for group in optimizer.param_groups:
                group["lr"] = spec.lr_at(cfg, step)
            start = time.perf_counter()
            loss = model.loss_from_logits(ddp(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            counter.reset()
            with counter:
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            loss_value = float(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        step_bytes.append(counter.bytes_sent)
        step_calls.append(sum(counter.calls.values()))
        losses.append(loss_value)
        if tx_marks:  # after the step's last collective: its traffic (nearly all ranks' of it) has crossed lo
            tx_marks.append(read_tx_bytes())
        if progress is not None:
            progress(step + 1, sum(step_times))
        if not math.isfinite(loss_value):
            logger.warning("%s: rank %d loss is %s at step %d", name, rank, loss_value, step)
    dist.barrier()
    wall = time.perf_counter() - wall_start
    if tx_marks:
        wire_steps = [(b - a) / world for a, b in zip(tx_marks[:-1], tx_marks[1:])]
        wire_median: Optional[float] = statistics.median(wire_steps)
        wire_mean: Optional[float] = (read_tx_bytes() - tx_marks[0]) / (world * cfg.steps)
    else:
        wire_median = wire_mean = None

    model.eval()
    eval_sum, eval_count, eval_hits, eval_predictions = 0.0, 0, 0, 0
    with torch.no_grad():
        for inputs, targets in eval_set[rank::world]:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            hits, predictions = model.correct(logits, targets)
            eval_sum += float(model.loss_from_logits(logits, targets)) * predictions
            eval_count += predictions
            eval_hits += hits
            eval_predictions += predictions

    local = {"losses": losses, "bytes": step_bytes, "calls": step_calls, "times": step_times, "wall": wall,
             "eval_sum": eval_sum, "eval_count": eval_count, "eval_hits": eval_hits,
             "checksum": _param_checksum(model)}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    del ddp, state, optimizer
    if rank != 0:
        return None

    steps = cfg.steps
    mean_loss = [sum(g["losses"][s] for g in gathered) / world for s in range(steps)]
    rank_mean_bytes = [sum(g["bytes"][s] for g in gathered) / world for s in range(steps)]
    bytes_per_step = statistics.median(rank_mean_bytes)
    mean_bytes_per_step = sum(rank_mean_bytes) / steps
    # a step ends for everyone at the same collective, so the slowest rank sets its time
    step_s = [max(g["times"][s] for g in gathered) for s in range(steps)]
    checksums = [g["checksum"] for g in gathered]
    eval_count_total = sum(g["eval_count"] for g in gathered)
    window = mean_loss[-cfg.window:]
    return {
        "method": name,
        "description": spec.description,
        "status": "ok",
        "reason": None,
        "optimizer": spec.optimizer,
        "lr": spec.base_lr(cfg),
        "eps": spec.eps if spec.zeroth_order else None,
        "workers": world,
        "steps": steps,
        "step_time_s": statistics.median(step_s),
        "bytes_per_worker_per_step": bytes_per_step,
        "mean_bytes_per_worker_per_step": mean_bytes_per_step,
        "wire_bytes_per_worker_per_step": wire_median,
        "mean_wire_bytes_per_worker_per_step": wire_mean,
        "fp32_allreduce_bytes_per_step": fp32_bytes,
        "compression_ratio": fp32_bytes / bytes_per_step if bytes_per_step > 0 else None,  # None: sent nothing
        "initial_loss": mean_loss[0],
        "final_loss": sum(window) / len(window),
        "eval_loss": sum(g["eval_sum"] for g in gathered) / max(1, eval_count_total),
        "eval_accuracy": sum(g["eval_hits"] for g in gathered) / max(1, eval_count_total),
        "collective_calls_per_step": sum(sum(g["calls"]) for g in gathered) / (world * steps),
        "wall_s": max(g["wall"] for g in gathered),
        "replicas_in_sync": max(checksums) - min(checksums) <= 1e-9 * max(1.0, abs(checksums[0])),
        "loss_curve": mean_loss,
        "step_time_curve_s": step_s,
        "bytes_curve": rank_mean_bytes,
    }


def _worker(rank: int, world: int, port: int, cfg: BenchConfig, methods: list[tuple[int, str, MethodSpec]],
            run_dir: str, measure_wire: bool, log_level: Optional[int]) -> None:
    """Entry point of one DDP process (forked, or spawned for NCCL, by :func:`_launch`): run the methods in turn.

    Rank 0 writes ``result_<index>.json`` after each method and keeps
    ``progress`` (method index, steps done, their total time) up to date for
    the harness's hang detector.
    """
    if log_level is not None:
        logging.basicConfig(level=log_level, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    backend = cfg.resolved_backend
    options = None
    if backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        if cfg.gloo_threads is not None:
            options = dist.ProcessGroupGloo._Options()
            options._threads = cfg.gloo_threads
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=cfg.start_timeout_s),
                            pg_options=options)
    try:
        corpus = load_corpus(cfg.corpus_bytes)
        eval_set = eval_batches(corpus, cfg.eval_batches, cfg.eval_batch_size, cfg.model_spec.context,
                                seed=cfg.seed + 1234)
        for index, name, spec in methods:
            progress = (functools.partial(_write_progress, os.path.join(run_dir, "progress"), index)
                        if rank == 0 else None)
            result = _train_one(name, spec, cfg, corpus, eval_set, rank, world, device, progress, measure_wire)
            if result is not None:
                _write_atomic(os.path.join(run_dir, f"result_{index}.json"), json.dumps(result))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _write_progress(path: str, index: int, steps: int, seconds: float) -> None:
    _write_atomic(path, f"{index} {steps} {seconds:.6f}\n")


def _launch(spec_path: str) -> int:
    """One launcher process: start the workers, which run the methods in turn, and wait (a worker failure raises)."""
    import torch.multiprocessing as mp

    with open(spec_path, "rb") as fh:
        cfg, methods, run_dir, measure_wire, log_level = pickle.load(fh)
    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(levelname)s launcher %(name)s: %(message)s")
    # fork: no second import of torch per worker; CUDA must not be initialised before a fork, so NCCL spawns
    start_method = "spawn" if cfg.resolved_backend == "nccl" else "fork"
    mp.start_processes(_worker, args=(cfg.workers, _free_port(), cfg, methods, run_dir, measure_wire, log_level),
                       nprocs=cfg.workers, join=True, start_method=start_method)
    return 0


# --------------------------------------------------------------------------- harness side


@contextlib.contextmanager
def _signals_raise_keyboard_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt (like Ctrl-C), so that clean-up in ``finally`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Terminate, then kill, the launcher's whole process group (its workers included)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the launcher is gone; its workers may outlive it for a moment
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.:]*(Error|Exception|Interrupt|EnforceNotMet)\b.*)$")
_ABORT_LINE = re.compile(r"^\s*((terminate called|  what\(\)).*)$")


def _failure_reason(log_text: str, returncode: Optional[int]) -> str:
    """The most telling lines of a failed launcher's output: the worker's exception (or C++ abort message)."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    errors = [m.group(1) for line in lines if (m := _ERROR_LINE.match(line))]
    aborts = [m.group(1).strip() for line in lines if (m := _ABORT_LINE.match(line))]
    # torch.multiprocessing wraps a worker's exception; the innermost line names the real one
    interesting = [e for e in errors if not e.startswith("torch.multiprocessing")]
    tail = (interesting or errors or lines[-1:] or ["no output"])[-1]
    if aborts and not interesting:  # a worker died on a C++ exception: say which, then how the launcher saw it
        tail = f"{' '.join(aborts[-2:])} ({tail})"
    return f"worker crashed (exit code {returncode}): {tail[:500]}"


def _unavailable_reason(spec: MethodSpec) -> Optional[str]:
    if not spec.needs_pycomm:
        return None
    try:
        import pycomm
    except ImportError as e:  # the extension failed to build or load
        return f"pycomm not importable: {e}"
    if spec.pycomm_name is not None and spec.pycomm_name not in pycomm.available_methods():
        return f"pycomm method {spec.pycomm_name!r} is not registered in this build"
    return None


def _empty_result(name: str, spec: MethodSpec, cfg: BenchConfig, status: str, reason: str) -> dict[str, Any]:
    return {
        "method": name, "description": spec.description, "status": status, "reason": reason,
        "optimizer": spec.optimizer, "lr": spec.base_lr(cfg), "eps": spec.eps if spec.zeroth_order else None,
        "workers": cfg.workers, "steps": cfg.steps, "step_time_s": None, "bytes_per_worker_per_step": None,
        "mean_bytes_per_worker_per_step": None, "wire_bytes_per_worker_per_step": None,
        "mean_wire_bytes_per_worker_per_step": None,
        "fp32_allreduce_bytes_per_step": None, "compression_ratio": None, "initial_loss": None, "final_loss": None,
        "eval_loss": None, "eval_accuracy": None, "collective_calls_per_step": None, "wall_s": None,
        "replicas_in_sync": None, "loss_curve": [], "step_time_curve_s": [], "bytes_curve": [],
    }


def _read_progress(path: str) -> tuple[int, int, float]:
    """Method index, steps done and their total time, from rank 0's progress file ((-1, 0, 0.0) before any)."""
    try:
        with open(path, encoding="utf-8") as fh:
            index, steps, seconds = fh.read().split()
        return int(index), int(steps), float(seconds)
    except (OSError, ValueError):
        return -1, 0, 0.0


def _run_pool(pending: list[tuple[int, str, MethodSpec]], cfg: BenchConfig, net: Optional[ShapedNamespace],
              run_root: str, log_level: Optional[int],
              on_start: Callable[[int], None], on_result: Callable[[int, dict[str, Any]], None]) -> None:
    """Run the methods in worker pools: one launcher runs them in turn; a crash or a stall fails the running
    method, kills the whole pool, and a fresh pool takes the rest."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the launcher sees this process's sys.path (as multiprocessing's spawn does), so that methods defined in
    # the caller's modules unpickle there
    paths = [package_root, *(p for p in sys.path if p), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(p for p in paths if p)))
    pending = list(pending)
    while pending:
        run_dir = tempfile.mkdtemp(prefix="pool-", dir=run_root)
        spec_path = os.path.join(run_dir, "launch.pkl")
        with open(spec_path, "wb") as fh:
            pickle.dump((cfg, pending, run_dir, net is not None, log_level), fh)
        command = (net.exec_prefix() if net is not None else []) + [
            sys.executable, "-m", "pycomm.bench_e2e", "--launch", spec_path]
        log_path = os.path.join(run_dir, "launcher.log")
        progress_path = os.path.join(run_dir, "progress")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        failure: Optional[str] = None
        try:
            on_start(pending[0][0])
            started = last_change = time.monotonic()
            seen, mean_step = 0, 0.0
            while True:
                exited = proc.poll() is not None
                while pending and os.path.exists(os.path.join(run_dir, f"result_{pending[0][0]}.json")):
                    index = pending.pop(0)[0]
                    with open(os.path.join(run_dir, f"result_{index}.json"), encoding="utf-8") as fh:
                        result = json.load(fh)
                    result["shaped"] = net is not None
                    on_result(index, result)
                    if pending:
                        on_start(pending[0][0])
                    started = last_change = time.monotonic()
                    seen, mean_step = 0, 0.0
                if exited or not pending:
                    break
                time.sleep(0.25)
                now = time.monotonic()
                index, done, seconds = _read_progress(progress_path)
                if index == pending[0][0] and done != seen:
                    seen, last_change, mean_step = done, now, seconds / max(done, 1)
                if seen == 0:
                    if now - started > cfg.start_timeout_s:
                        failure = f"no step finished within {cfg.start_timeout_s:.0f} s of the start (hung; killed)"
                        break
                    continue
                limit = max(cfg.stall_timeout_s, 3.0 * mean_step)
                if now - last_change > limit:
                    failure = f"no progress for {limit:.0f} s after step {seen} of {cfg.steps} (hung; killed)"
                    break
        finally:
            _kill_group(proc)
        if not pending:
            break
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            log_text = fh.read()
        index, name, spec = pending.pop(0)
        reason = failure or _failure_reason(log_text, proc.returncode)
        logger.info("%s failed; launcher output:\n%s", name, log_text[-4000:])
        result = _empty_result(name, spec, cfg, "failed", reason)
        result["shaped"] = net is not None
        on_result(index, result)


def _resolve(methods: Union[str, Iterable[str], Mapping[str, MethodSpec]]) -> list[tuple[str, MethodSpec]]:
    if isinstance(methods, Mapping):
        resolved = list(methods.items())
    else:
        names = [methods] if isinstance(methods, str) else list(methods)
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        resolved = [(n, METHODS[n]) for n in names]
    if not resolved:
        raise ValueError("no methods given")
    return resolved


def _format_bytes(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _format_ratio(ratio: Optional[float]) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 1000 else f"{ratio:.2f}x"


def _progress_line(index: int, total: int, r: Mapping[str, Any]) -> str:
    if r["status"] != "ok":
        return f"[{index}/{total}] {r['method']:<15} {r['status'].upper()}: {r['reason']}"
    wire = r.get("wire_bytes_per_worker_per_step")
    wire_text = f", wire {wire:,.0f} B" if wire is not None else ""
    sync = "" if r["replicas_in_sync"] else ", REPLICAS DIVERGED"
    return (f"[{index}/{total}] {r['method']:<15} loss {r['initial_loss']:.3f} -> {r['final_loss']:.3f} "
            f"(eval {r['eval_loss']:.3f}, acc {r['eval_accuracy']:.3f}), {r['step_time_s']:.3f} s/step, "
            f"{r['bytes_per_worker_per_step']:,.0f} B/worker/step{wire_text} "
            f"({_format_ratio(r['compression_ratio'])} vs fp32), {r['wall_s']:.1f} s{sync}")


_OPTIMIZER_NOTES = {
    "adamw": "adamw = AdamW(betas=(0.9, 0.95))",
    "sgd-momentum": "sgd-momentum = SGD(momentum=0.9)",
    "sgd": "sgd = SGD(momentum=0), the hook applies momentum (dgc: 0.9)",
    "spsa": "spsa = pycomm.zo.SPSA, zeroth order: no DDP, no backward pass, one byte per rank per step "
    "(counted as W-1 bytes sent: its byte to each peer)",
}


def format_table(results: Sequence[Mapping[str, Any]], network: Optional[Mapping[str, Any]] = None) -> str:
    """The results as a Markdown table, under a line that says how the network was set up.

    Columns: method | optimizer | final loss | eval loss | eval acc | s/step |
    speed vs allreduce | bytes/worker/step (counted) | wire bytes/worker/step
    (shaped runs) | compression vs fp32 | est. link s/step (when a bandwidth
    was requested). Failed and unavailable methods get a row with the reason.

    Args:
        results: rows as :func:`run_e2e` returns them.
        network: the ``network`` dict of :func:`run_e2e`'s JSON; None omits the header line.
    """
    lines: list[str] = []
    if network is not None:
        lines += [_network_line(network), ""]
    lines += [
        "| method | optimizer | final loss | eval loss | eval acc | s/step | speed vs allreduce | "
        "bytes/worker/step | wire bytes/worker/step | compression vs fp32 | est. link s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = next((r["step_time_s"] for r in results if r["method"] == "allreduce" and r["status"] == "ok"), None)
    used: list[str] = []
    for r in results:
        optimizer = r.get("optimizer", "adamw")
        lr = f" lr {r['lr']:g}" if r.get("lr") is not None else ""
        eps = f" eps {r['eps']:g}" if r.get("eps") is not None else ""
        if r["status"] != "ok":
            reason = " ".join(str(r["reason"]).split()).replace("|", "\\|")
            lines.append(f"| {r['method']} | {optimizer}{lr}{eps} | {r['status']}: {reason} "
                         "| | | | | | | | |")
            continue
        if optimizer not in used:
            used.append(optimizer)
        speed = f"{baseline / r['step_time_s']:.2f}x" if baseline and r["step_time_s"] > 0 else "-"
        link = r.get("estimated_link_s_per_step")
        lines.append(
            f"| {r['method']} | {optimizer}{lr}{eps} | {r['final_loss']:.3f} | {r['eval_loss']:.3f} | "
            f"{r['eval_accuracy']:.3f} | {r['step_time_s']:.3f} | {speed} | "
            f"{_format_bytes(r['bytes_per_worker_per_step'])} | "
            f"{_format_bytes(r.get('wire_bytes_per_worker_per_step'))} | "
            f"{_format_ratio(r['compression_ratio'])} | {'-' if link is None else f'{link:.3f}'} |"
        )
    if len(used) > 1:
        lines.append("\nOptimizers: " + "; ".join(_OPTIMIZER_NOTES.get(o, o) for o in used)
                     + ". Peak lr as shown, on the same warm-up/cosine schedule.")
    return "\n".join(lines)


def _network_line(network: Mapping[str, Any]) -> str:
    run = (f"model {network['model']} ({network['parameters']:,} parameters), {network['workers']} workers "
           f"({network['backend']}), {network['steps']} steps, batch {network['batch_size']}/worker")
    if network["shaped"]:
        delay = f", delay {network['delay']}" if network.get("delay_applied") else ""
        note = f" ({network['delay_note']})" if network.get("delay_note") else ""
        return (f"**Shaped**: {run}; all workers in network namespace `{network['namespace']}`, loopback limited "
                f"to {network['bandwidth']} by tc tbf{delay}, one link shared by all workers{note}. "
                "Wire bytes: lo tx_bytes per step / workers, median over steps.")
    if network.get("bandwidth"):
        return (f"**Unshaped** ({network['unshaped_reason']}): {run}; est. link s/step = the time the counted "
                f"bytes of all workers take on one shared {network['bandwidth']} link.")
    return f"**Unshaped** (no --bandwidth): {run}."


def write_plots(results: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    """Plot loss against wall-clock time and against bytes sent; return the PNG paths (none without matplotlib).

    Writes ``<prefix>_loss_vs_time.png`` and ``<prefix>_loss_vs_bytes.png``
    (cumulative step time of the slowest rank; cumulative counted bytes per
    worker). Needs the optional ``matplotlib`` (``pip install pycomm[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plots")
        return []
    rows = [r for r in results if r["status"] == "ok" and r["loss_curve"]]
    paths = []
    for key, label, suffix in (("step_time_curve_s", "wall-clock time of the training steps (s)", "time"),
                               ("bytes_curve", "bytes sent per worker (counted)", "bytes")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            xs, total = [], 0.0
            for value in r[key]:
                total += value
                xs.append(total)
            ax.plot(xs, r["loss_curve"], label=r["method"])
        ax.set_xlabel(label)
        ax.set_ylabel("training loss (nats/byte)")
        if suffix == "bytes":
            ax.set_xscale("symlog", linthresh=1.0)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        path = f"{prefix}_loss_vs_{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def run_e2e(methods: Union[str, Iterable[str], Mapping[str, MethodSpec]] = DEFAULT_METHODS,
            config: Optional[BenchConfig] = None, *, json_path: Optional[str] = None,
            markdown_path: Optional[str] = None, plot_prefix: Optional[str] = None,
            out: Optional[TextIO] = None, verbose: bool = True, title: str = "pycomm bench e2e") -> dict[str, Any]:
    """Train under each method, over a shaped link where possible, and compare them.

    Args:
        methods: names in :data:`METHODS`, or a mapping from name to :class:`MethodSpec`.
        config: the run's settings (default :class:`BenchConfig`).
        json_path: write the report as JSON there.
        markdown_path: write the table (with its header line) there.
        plot_prefix: write PNG plots there (see :func:`write_plots`; needs matplotlib).
        out: stream for the progress lines and the table (default stdout).
        verbose: print progress lines and the table.
        title: first word of the progress output.

    Returns:
        ``{"config": ..., "network": ..., "results": [...]}``: ``network`` says
        whether the run was shaped (namespace, qdisc, bandwidth, delay) or why
        not; ``results`` has one dict per method, in order, with ``method``,
        ``status`` (``ok``, ``failed`` or ``unavailable``), ``reason``,
        ``step_time_s``, ``bytes_per_worker_per_step``,
        ``wire_bytes_per_worker_per_step`` (None when unshaped),
        ``compression_ratio``, ``final_loss``, ``eval_loss``, ``eval_accuracy``,
        ``shaped``, ``estimated_link_s_per_step`` (None without a bandwidth)
        and the per-step curves (see the module docstring).

    Raises:
        ValueError: on an unknown method or bad settings.
        KeyboardInterrupt: on Ctrl-C, SIGTERM or SIGHUP, after the running
            method's processes and the namespace are gone.
    """
    cfg = config or BenchConfig()
    resolved = _resolve(methods)
    stream = out if out is not None else sys.stdout
    root = logging.getLogger()
    log_level = root.getEffectiveLevel() if root.handlers else None
    parameters = sum(p.numel() for p in cfg.model_spec.build().parameters())
    network: dict[str, Any] = {
        "model": cfg.model, "parameters": parameters, "workers": cfg.workers, "backend": cfg.resolved_backend,
        "steps": cfg.steps, "batch_size": cfg.batch, "bandwidth": cfg.bandwidth, "delay": cfg.delay,
        "shaped": False, "unshaped_reason": None, "namespace": None, "qdisc": None, "delay_applied": False,
        "delay_note": None,
    }
    results: list[dict[str, Any]] = []
    net: Optional[ShapedNamespace] = None
    with _signals_raise_keyboard_interrupt(), tempfile.TemporaryDirectory(prefix="pycomm-e2e-") as run_root:
        try:
            if cfg.bandwidth is None:
                network["unshaped_reason"] = "no bandwidth requested"
            elif not cfg.shape:
                network["unshaped_reason"] = "shaping turned off (--no-shape)"
            elif (reason := shaping_unavailable_reason()) is not None:
                network["unshaped_reason"] = reason
            else:
                try:
                    net = ShapedNamespace(cfg.bandwidth, cfg.delay).create()
                except RuntimeError as e:
                    network["unshaped_reason"] = f"shaping failed: {e}"
                    net = None
                if net is not None:
                    network.update(shaped=True, namespace=net.name, qdisc=net.qdisc,
                                   delay_applied=net.delay_applied, delay_note=net.delay_note)
            if verbose:
                print(f"{title}: {len(resolved)} method(s); {_network_line(network)}", file=stream, flush=True)
            rate = parse_rate(cfg.bandwidth) if cfg.bandwidth else None
            total = len(resolved)
            slots: list[Optional[dict[str, Any]]] = [None] * total

            def on_start(index: int) -> None:
                if verbose:
                    print(f"[{index + 1}/{total}] {resolved[index][0]}: running ...", file=stream, flush=True)

            def on_result(index: int, result: dict[str, Any]) -> None:
                counted = result["bytes_per_worker_per_step"]
                result["estimated_link_s_per_step"] = (
                    cfg.workers * counted * 8 / rate if rate is not None and counted is not None else None)
                slots[index] = result
                if verbose:
                    print(_progress_line(index + 1, total, result), file=stream, flush=True)

            runnable = []
            for index, (name, spec) in enumerate(resolved):
                reason = _unavailable_reason(spec)
                if reason is None:
                    runnable.append((index, name, spec))
                else:
                    result = _empty_result(name, spec, cfg, "unavailable", reason)
                    result["shaped"] = net is not None
                    on_result(index, result)
            _run_pool(runnable, cfg, net, run_root, log_level, on_start, on_result)
            results = [r for r in slots if r is not None]
        finally:
            if net is not None:
                net.remove()
    report = {"config": cfg.to_dict(), "network": network, "results": results}
    table = format_table(results, network)
    if verbose:
        print("", file=stream)
        print(table, file=stream, flush=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        logger.info("wrote %s", json_path)
    if markdown_path:
        with open(markdown_path, "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
    if plot_prefix:
        for path in write_plots(results, plot_prefix):
            if verbose:
                print(f"wrote {path}", file=stream, flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pycomm.bench_e2e [ARGS]``: the same as ``pycomm bench e2e [ARGS]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--launch"] and len(args) == 2:  # internal: one method's launcher
        return _launch(args[1])
    from pycomm.cli import main as cli_main

    return cli_main(["bench", "e2e", *args])


if __name__ == "__main__":
    # run the imported module's main, so that pickles and workers see one pycomm.bench_e2e, not __main__
    from pycomm.bench_e2e import main as _module_main

    sys.exit(_module_main())

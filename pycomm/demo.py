"""End-to-end demo: train a byte-level transformer LM with DDP under several
gradient-communication methods and compare convergence, traffic and speed.

:func:`run_demo` starts ``workers`` CPU processes (``torch.multiprocessing``,
spawn start method, Gloo backend on 127.0.0.1). Inside one process group each
method in turn trains the same :class:`~pycomm.models.CharTransformer`, from the
same initial weights, on the same batches (see :mod:`pycomm.data`), for the
same number of steps. For every method it reports

* the final training loss (mean over the last few steps and over ranks),
* the loss on a fixed held-out set,
* the bytes each worker sent per step, counted by
  :class:`~pycomm.traffic.CollectiveByteCounter` around the backward pass and
  optimizer step: the median over steps, i.e. the steady state (pycomm's
  methods all-reduce uncompressed for their first ``start_iter`` steps); the
  mean over all steps is in the returned dicts too,
* the compression ratio against an uncompressed fp32 ring all-reduce of all
  gradients,
* the median wall time of a training step.

Methods are looked up by name in :data:`METHODS`; a new method is one line
there, made with :func:`torch_hook` (a PyTorch DDP communication hook),
:func:`pycomm_method` (``pycomm.register(ddp, name, **kwargs)``) or
:func:`spsa_method` (zeroth-order training with :class:`pycomm.zo.SPSA`).

Zeroth-order rows (``spsa``) train without DDP and without a backward pass:
each step is ``SPSA.step(closure)``, whose closure is the rank's training loss
(two perturbed forwards under ``torch.no_grad``), and its one ``all_gather`` of
one byte per rank is the only communication, counted by the same
:class:`~pycomm.traffic.CollectiveByteCounter` (``W - 1`` bytes per worker per
step: its byte goes to each peer). Their training loss is the mean of the two
perturbed losses that the step evaluates.

Each method also chooses its optimizer (:attr:`MethodSpec.optimizer`): AdamW by
default, SGD with or without momentum for methods that keep momentum in their
hook (Deep Gradient Compression), or SPSA for zeroth-order training, each with
its own base learning rate on the same warm-up/cosine schedule shape
(:meth:`DemoConfig.lr_scale`). The table shows the optimizer and base learning
rate of every row.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from pycomm.data import Corpus, eval_batches, load_corpus, train_batch, train_generator
from pycomm.models import CharTransformer, ModelConfig
from pycomm.traffic import CollectiveByteCounter

__all__ = [
    "OPTIMIZERS",
    "SGD_LR",
    "SPSA_LR",
    "SPSA_EPS",
    "PROJECTION_DIRECTIONS",
    "MethodSpec",
    "torch_hook",
    "pycomm_method",
    "spsa_method",
    "METHODS",
    "DEFAULT_METHODS",
    "DemoConfig",
    "run_demo",
    "format_table",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- methods


#: Optimizer names a :class:`MethodSpec` may choose, and what they build
#: (weight decay is ``DemoConfig.weight_decay`` in all three, applied locally):
#:
#: * ``"adamw"``: ``AdamW(betas=(0.9, 0.95))``,
#: * ``"sgd-momentum"``: ``SGD(momentum=0.9)``,
#: * ``"sgd"``: ``SGD(momentum=0)``, for methods whose hook applies momentum
#:   itself (DGC's momentum correction),
#: * ``"spsa"``: :class:`pycomm.zo.SPSA` (zeroth order, no weight decay), for
#:   methods made by :func:`spsa_method`; it replaces DDP and the backward pass.
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd-momentum", "sgd", "spsa")

#: Peak learning rate of the SGD methods (``allreduce-sgd`` and ``dgc``), tuned
#: for allreduce-sgd on the default run (200 steps, 4 workers, clipping at 1.0).
SGD_LR: float = 0.1


@dataclass(frozen=True)
class MethodSpec:
    """How to attach one gradient-communication method to a DDP model, and how to train it.

    Attributes:
        attach: called as ``attach(ddp_model, config)`` (config: the run's
            :class:`DemoConfig`) on every rank right after DDP construction;
            registers the communication hook and returns its state (kept alive
            for the run), or None. It is sent to the worker processes, so it
            must be picklable (a module-level function or a
            :func:`functools.partial` of one). None for the ``"spsa"``
            optimizer, which trains without DDP.
        description: one line for reports.
        needs_pycomm: whether it needs ``pycomm.register``.
        optimizer: one of :data:`OPTIMIZERS`.
        lr: peak learning rate; None means ``DemoConfig.lr``. The schedule has
            the shape of :meth:`DemoConfig.lr_at`, scaled to this peak.
        clip_in_hook: the hook clips the gradients itself (DGC's local
            clipping, before its momentum), so the demo does not clip after the
            backward pass; otherwise the averaged gradients are clipped to
            ``DemoConfig.grad_clip`` before the optimizer step.
        eps: the perturbation scale of the ``"spsa"`` optimizer (unused by the others).
    """

    attach: Optional[Callable[[DDP, "DemoConfig"], Any]]
    description: str
    needs_pycomm: bool = False
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

    def base_lr(self, cfg: "DemoConfig") -> float:
        """The peak learning rate of this method under ``cfg``."""
        return self.lr if self.lr is not None else cfg.lr

    def lr_at(self, cfg: "DemoConfig", step: int) -> float:
        """The learning rate of ``step``: ``cfg``'s schedule shape scaled to :meth:`base_lr`."""
        return self.base_lr(cfg) * cfg.lr_scale(step)

    def make_optimizer(
        self, params: Union[torch.nn.Module, Iterable[torch.nn.Parameter]], cfg: "DemoConfig"
    ) -> Any:
        """The optimizer this method trains with (see :data:`OPTIMIZERS`).

        ``params`` may be the model itself; the ``"spsa"`` optimizer prefers it
        (it then perturbs one module's parameters at a time) and is seeded
        with ``cfg.seed`` on every rank.
        """
        lr = self.base_lr(cfg)
        if isinstance(params, torch.nn.Module) and not self.zeroth_order:
            params = params.parameters()
        if self.zeroth_order:
            from pycomm.zo import SPSA

            return SPSA(params, lr=lr, eps=self.eps, seed=cfg.seed)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        momentum = 0.9 if self.optimizer == "sgd-momentum" else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)


def _attach_torch_hook(hook: Callable[..., Any], ddp: DDP, cfg: "DemoConfig") -> None:
    ddp.register_comm_hook(state=None, hook=hook)
    return None


def _attach_pycomm(
    name: str,
    kwargs: Mapping[str, Any],
    config_options: Optional[Callable[["DemoConfig"], Mapping[str, Any]]],
    ddp: DDP,
    cfg: "DemoConfig",
) -> Any:
    import pycomm

    options = dict(kwargs)
    if config_options is not None:
        options.update(config_options(cfg))
    return pycomm.register(ddp, name, **options)


def torch_hook(
    hook: Callable[..., Any],
    description: Optional[str] = None,
    *,
    optimizer: str = "adamw",
    lr: Optional[float] = None,
) -> MethodSpec:
    """A method that registers a PyTorch DDP communication hook with ``state=None``.

    Args:
        hook: a hook such as ``default_hooks.allreduce_hook``.
        description: report text; defaults to the hook's name.
        optimizer, lr: see :class:`MethodSpec`.
    """
    return MethodSpec(
        attach=functools.partial(_attach_torch_hook, hook),
        description=description or f"torch {hook.__name__}",
        optimizer=optimizer,
        lr=lr,
    )


def pycomm_method(
    name: str,
    *,
    config_options: Optional[Callable[["DemoConfig"], Mapping[str, Any]]] = None,
    description: Optional[str] = None,
    **kwargs: Any,
) -> MethodSpec:
    """A method that calls ``pycomm.register(ddp_model, name, **kwargs)``.

    Choose the optimizer with :func:`dataclasses.replace` on the result, e.g.
    ``replace(pycomm_method("dgc"), optimizer="sgd", lr=0.5, clip_in_hook=True)``.

    Args:
        name: the pycomm method name, e.g. ``"quant"``.
        config_options: options that depend on the run, as a picklable
            ``config_options(config) -> dict`` (they override ``kwargs``).
        description: report text; defaults to the name and options.
        **kwargs: its options, e.g. ``bits=4``.
    """
    options = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return MethodSpec(
        attach=functools.partial(_attach_pycomm, name, dict(kwargs), config_options),
        description=description or f"pycomm {name}({options})",
        needs_pycomm=True,
    )


def spsa_method(lr: float, eps: float, description: Optional[str] = None) -> MethodSpec:
    """A zeroth-order method: :class:`pycomm.zo.SPSA` with one byte per worker per step.

    It trains the plain model (no DDP, no hook, no backward pass; the replicas
    start from rank 0's weights via ``SPSA.sync``), with learning rate ``lr`` on
    the demo's schedule and perturbation scale ``eps``.
    """
    return MethodSpec(
        attach=None,
        description=description or f"pycomm.zo.SPSA(lr={lr:g}, eps={eps:g}), zeroth order, one byte per rank per step",
        needs_pycomm=True,
        optimizer="spsa",
        lr=lr,
        eps=eps,
    )


#: Directions (bytes per bucket per rank) of the ``spsa-projection`` row. It
#: trains with AdamW at the default lr: on the default run (200 steps, 4 workers)
#: AdamW 3e-3 beat AdamW 1e-3 and 1e-2 and K=4, and SGD with momentum barely
#: moved (the projected gradient is about K/n of the gradient's energy). The
#: row uses the hook's default, no error feedback: with it the residual becomes
#: a running sum of stale gradients (final train loss 4.03 against 3.71 without;
#: see :class:`pycomm.hooks.ProjectionState`).
PROJECTION_DIRECTIONS: int = 8

#: Peak learning rate and perturbation scale of the ``spsa`` row, tuned on the
#: default run: lr 2e-3 .. 1e-2 all train (3e-3 .. 7e-3 about equally well),
#: eps 1e-2 was worse than 1e-3.
SPSA_LR: float = 5e-3
SPSA_EPS: float = 1e-3


#: Fraction of the run that DGC's density warm-up spans (the paper: 4 of ~90 epochs).
DGC_WARMUP_FRACTION: float = 0.12


def _dgc_options(cfg: "DemoConfig") -> dict[str, Any]:
    """DGC options that follow the run: the paper's density warm-up (4 stages,
    25% .. 0.4%) over the first ~12% of the steps, and local clipping at the
    demo's threshold (scaled by ``W^-1/2`` in the hook)."""
    from pycomm.hooks.dgc import PAPER_WARMUP_DENSITIES

    stage = max(1, round(cfg.steps * DGC_WARMUP_FRACTION / len(PAPER_WARMUP_DENSITIES)))
    return {"warmup_steps": stage, "clip_norm": cfg.grad_clip if cfg.grad_clip > 0 else None}


#: Method name -> :class:`MethodSpec`. Add a method with one line here.
METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        "allreduce": torch_hook(default_hooks.allreduce_hook, "fp32 ring all-reduce (torch allreduce_hook)"),
        "fp16": torch_hook(default_hooks.fp16_compress_hook, "fp16 all-reduce (torch fp16_compress_hook)"),
        "quant8": pycomm_method("quant", bits=8),
        "quant4": pycomm_method("quant", bits=4),
        "quant2": pycomm_method("quant", bits=2),
        # SGD pair: the dense baseline with optimizer momentum, and DGC with its momentum in the hook
        "allreduce-sgd": torch_hook(
            default_hooks.allreduce_hook,
            "fp32 ring all-reduce (torch allreduce_hook), SGD momentum 0.9",
            optimizer="sgd-momentum",
            lr=SGD_LR,
        ),
        "dgc": replace(
            pycomm_method(
                "dgc",
                density=0.001,
                momentum=0.9,
                config_options=_dgc_options,
                description="pycomm dgc(density=0.001, momentum=0.9), warm-up over ~12% of steps, local clipping; "
                "SGD momentum 0",
            ),
            optimizer="sgd",
            lr=SGD_LR,
            clip_in_hook=True,
        ),
        # issue 4: shared-seed random projections (K bytes per bucket per rank) and one-byte SPSA
        "spsa-projection": pycomm_method(
            "spsa-projection",
            num_directions=PROJECTION_DIRECTIONS,
            description=f"pycomm spsa-projection(num_directions={PROJECTION_DIRECTIONS}), no error feedback "
            "(the hook's default); AdamW",
        ),
        "spsa": spsa_method(SPSA_LR, SPSA_EPS),
    }
)

#: Methods run by ``pycomm demo`` when none are named.
DEFAULT_METHODS: tuple[str, ...] = (
    "allreduce",
    "quant8",
    "quant4",
    "quant2",
    "allreduce-sgd",
    "dgc",
    "spsa-projection",
    "spsa",
)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run except the methods.

    Attributes:
        workers: number of DDP processes.
        steps: optimizer steps per method.
        batch_size: sequences per worker per step.
        model: the model shape (its ``context`` is the sequence length).
        lr: peak learning rate (linear warm-up, cosine decay to 10%) of the
            methods without their own (:attr:`MethodSpec.lr`): the AdamW ones.
        warmup_steps: warm-up length; defaults to 10% of ``steps``.
        weight_decay: weight decay of every optimizer.
        grad_clip: gradient-norm clipping threshold (0 disables); methods with
            :attr:`MethodSpec.clip_in_hook` pass it to their hook instead.
        bucket_cap_mb: DDP bucket size; None keeps DDP's default (25 MB, with
            a 1 MB first bucket).
        seed: seeds the initial weights (same for all methods) and the data
            (``seed + rank`` per worker).
        corpus_bytes: size of the stdlib-source corpus.
        eval_batches: number of held-out batches (split across workers).
        eval_batch_size: sequences per held-out batch.
        final_window: the final training loss averages this many last steps;
            defaults to ``max(1, min(10, steps // 5))``.
        timeout_s: process-group timeout.
    """

    workers: int = 4
    steps: int = 200
    batch_size: int = 16
    model: ModelConfig = field(default_factory=lambda: ModelConfig(context=64, n_layer=2, n_head=4, d_model=128))
    lr: float = 3e-3
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bucket_cap_mb: Optional[float] = None
    seed: int = 0
    corpus_bytes: int = 2_000_000
    eval_batches: int = 8
    eval_batch_size: int = 32
    final_window: Optional[int] = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def warmup(self) -> int:
        """Effective warm-up length in steps."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    @property
    def window(self) -> int:
        """Effective number of final steps averaged for the final training loss."""
        return self.final_window if self.final_window is not None else max(1, min(10, self.steps // 5))

    def lr_scale(self, step: int) -> float:
        """Schedule of ``step`` (0-based) as a fraction of the peak: linear warm-up, then cosine to 0.1."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        """Learning rate of ``step`` (0-based): linear warm-up, then cosine to 10% of ``lr``."""
        return self.lr * self.lr_scale(step)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-friendly dict."""
        return asdict(self)


def fp32_allreduce_bytes(model: torch.nn.Module, workers: int) -> int:
    """Bytes one worker sends per step in an fp32 ring all-reduce of all gradients.

    Uses the same ``2 * (W - 1) / W * bytes`` rule as
    :class:`~pycomm.traffic.CollectiveByteCounter`, per parameter.
    """
    return sum(2 * (workers - 1) * p.numel() * 4 // workers for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- worker


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _param_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() + p.double().sum() for p in model.parameters()))


def _train_one(
    name: str,
    spec: MethodSpec,
    cfg: DemoConfig,
    corpus: Corpus,
    eval_set: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    world: int,
) -> Optional[dict[str, Any]]:
    """Train one method on this rank; return the merged result on rank 0."""
    torch.manual_seed(cfg.seed)
    model = CharTransformer(cfg.model)
    fp32_bytes = fp32_allreduce_bytes(model, world)
    if spec.zeroth_order:
        # no DDP and no hook: SPSA's one-byte all_gather is the only communication
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
    wall_start = time.perf_counter()
    for step in range(cfg.steps):
        inputs, targets = train_batch(corpus, cfg.batch_size, cfg.model.context, generator)
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
            logits = ddp(inputs)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            counter.reset()
            with counter:
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            loss_value = float(loss.detach())
        step_times.append(time.perf_counter() - start)
        step_bytes.append(counter.bytes_sent)
        step_calls.append(sum(counter.calls.values()))
        losses.append(loss_value)
        if not math.isfinite(losses[-1]):
            logger.warning("%s: rank %d loss is %s at step %d", name, rank, losses[-1], step)
    wall = time.perf_counter() - wall_start

    # held-out loss: the eval batches are split across ranks, then summed
    model.eval()
    eval_sum, eval_count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in eval_set[rank::world]:
            eval_sum += float(model.loss(inputs, targets)) * targets.numel()
            eval_count += targets.numel()

    local = {
        "losses": losses,
        "bytes": step_bytes,
        "calls": step_calls,
        "times": step_times,
        "wall": wall,
        "eval_sum": eval_sum,
        "eval_count": eval_count,
        "checksum": _param_checksum(model),
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    del ddp, state, optimizer
    if rank != 0:
        return None

    steps = cfg.steps
    mean_loss = [sum(g["losses"][s] for g in gathered) / world for s in range(steps)]
    window = cfg.window
    # steady state: the median over steps of the mean over ranks (a method may
    # send uncompressed warm-up steps); the mean over all steps is kept too
    rank_mean_bytes = [sum(g["bytes"][s] for g in gathered) / world for s in range(steps)]
    bytes_per_step = statistics.median(rank_mean_bytes)
    mean_bytes_per_step = sum(rank_mean_bytes) / steps
    eval_count_total = sum(g["eval_count"] for g in gathered)
    # a step ends for everyone at the same all-reduce, so take the slowest rank
    step_ms = [1000.0 * max(g["times"][s] for g in gathered) for s in range(steps)]
    checksums = [g["checksum"] for g in gathered]
    return {
        "method": name,
        "description": spec.description,
        "optimizer": spec.optimizer,
        "lr": spec.base_lr(cfg),
        "eps": spec.eps if spec.zeroth_order else None,
        "workers": world,
        "steps": steps,
        "initial_loss": mean_loss[0],
        "final_train_loss": sum(mean_loss[-window:]) / len(mean_loss[-window:]),
        "eval_loss": sum(g["eval_sum"] for g in gathered) / max(1, eval_count_total),
        "bytes_per_worker_per_step": bytes_per_step,
        "mean_bytes_per_worker_per_step": mean_bytes_per_step,
        "fp32_allreduce_bytes_per_step": fp32_bytes,
        "compression": fp32_bytes / bytes_per_step if bytes_per_step > 0 else float("inf"),
        "mean_compression": fp32_bytes / mean_bytes_per_step if mean_bytes_per_step > 0 else float("inf"),
        "collective_calls_per_step": sum(sum(g["calls"]) for g in gathered) / (world * steps),
        "ms_per_step": statistics.median(step_ms),
        "wall_s": max(g["wall"] for g in gathered),
        "replicas_in_sync": max(checksums) - min(checksums) <= 1e-9 * max(1.0, abs(checksums[0])),
        "train_loss_curve": mean_loss,
    }


def _worker(
    rank: int,
    world: int,
    port: int,
    cfg: DemoConfig,
    methods: list[tuple[str, MethodSpec]],
    messages: Any,
    log_level: Optional[int],
) -> None:
    """Entry point of one spawned DDP process."""
    if log_level is not None:
        logging.basicConfig(level=log_level, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=cfg.timeout_s))
    try:
        corpus = load_corpus(cfg.corpus_bytes)
        eval_set = eval_batches(corpus, cfg.eval_batches, cfg.eval_batch_size, cfg.model.context, seed=cfg.seed + 1234)
        for name, spec in methods:
            result = _train_one(name, spec, cfg, corpus, eval_set, rank, world)
            if result is not None:
                messages.put(("result", result))
            dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- driver


def _resolve(methods: Union[Iterable[str], Mapping[str, MethodSpec]]) -> list[tuple[str, MethodSpec]]:
    if isinstance(methods, Mapping):
        resolved = list(methods.items())
    else:
        names = [methods] if isinstance(methods, str) else list(methods)
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
        resolved = [(n, METHODS[n]) for n in names]
    if not resolved:
        raise ValueError("no methods given")
    if any(spec.needs_pycomm for _, spec in resolved):
        import pycomm

        if not callable(getattr(pycomm, "register", None)):
            raise RuntimeError("pycomm.register is not available; run only the torch methods (e.g. allreduce, fp16)")
    return resolved


def _progress_line(index: int, total: int, r: Mapping[str, Any]) -> str:
    sync = "" if r["replicas_in_sync"] else ", REPLICAS DIVERGED"
    return (
        f"[{index}/{total}] {r['method']:<15} loss {r['initial_loss']:.3f} -> {r['final_train_loss']:.3f} "
        f"(eval {r['eval_loss']:.3f}), {r['bytes_per_worker_per_step']:,.0f} B/worker/step "
        f"({_format_compression(r['compression'])} vs fp32), {r['ms_per_step']:.1f} ms/step, {r['wall_s']:.1f} s{sync}"
    )


_OPTIMIZER_NOTES = {
    "adamw": "adamw = AdamW(betas=(0.9, 0.95))",
    "sgd-momentum": "sgd-momentum = SGD(momentum=0.9)",
    "sgd": "sgd = SGD(momentum=0), the method's hook applies momentum (dgc: 0.9)",
    "spsa": "spsa = pycomm.zo.SPSA, zeroth order: no DDP and no backward pass, two perturbed forwards "
    "and one all_gather of one byte per rank per step (counted as W-1 bytes sent: its byte to each peer); "
    "its train loss is the mean of the two perturbed losses",
}


def _format_compression(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 1000 else f"{ratio:.2f}x"


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The results as a Markdown table.

    Columns: method | optimizer | final train loss | eval loss |
    bytes/worker/step | compression vs fp32 | ms/step (bytes are the
    steady-state median; the optimizer column gives its peak learning rate,
    and the perturbation scale of SPSA rows). Compression ratios of 1000x and
    more are rounded to whole numbers.
    When the rows use more than one optimizer, a footnote line under the table
    says what each one is.
    """
    lines = [
        "| method | optimizer | final train loss | eval loss | bytes/worker/step | compression vs fp32 | ms/step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    used: list[str] = []
    for r in results:
        optimizer = r.get("optimizer", "adamw")
        if optimizer not in used:
            used.append(optimizer)
        lr = f" lr {r['lr']:g}" if "lr" in r else ""
        eps = f" eps {r['eps']:g}" if r.get("eps") is not None else ""
        lines.append(
            f"| {r['method']} | {optimizer}{lr}{eps} | {r['final_train_loss']:.3f} | {r['eval_loss']:.3f} | "
            f"{r['bytes_per_worker_per_step']:,.0f} | {_format_compression(r['compression'])} | "
            f"{r['ms_per_step']:.1f} |"
        )
    if len(used) > 1:
        notes = "; ".join(_OPTIMIZER_NOTES.get(o, o) for o in used)
        lines.append(f"\nOptimizers: {notes}. Peak lr as shown, on the same warm-up/cosine schedule.")
    return "\n".join(lines)


def run_demo(
    methods: Union[Iterable[str], Mapping[str, MethodSpec]] = DEFAULT_METHODS,
    workers: int = 4,
    steps: int = DemoConfig.steps,
    *,
    config: Optional[DemoConfig] = None,
    json_path: Optional[str] = None,
    out: Optional[TextIO] = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Train the demo model under each method with DDP and compare them.

    Args:
        methods: names in :data:`METHODS`, or a mapping from name to
            :class:`MethodSpec` for methods not registered there.
        workers: number of DDP worker processes.
        steps: training steps per method.
        config: further settings; its ``workers`` and ``steps`` are replaced
            by the arguments above.
        json_path: if given, write ``{"config": ..., "results": ...}`` there.
        out: stream for the progress lines and the table (default stdout).
        verbose: print progress lines and the table.

    Returns:
        One dict per method, in order, with keys ``method``, ``description``,
        ``optimizer``, ``lr``, ``eps`` (SPSA's perturbation scale, None for
        the other optimizers), ``workers``, ``steps``, ``initial_loss``, ``final_train_loss``,
        ``eval_loss``, ``bytes_per_worker_per_step`` (median over steps),
        ``mean_bytes_per_worker_per_step``, ``fp32_allreduce_bytes_per_step``,
        ``compression`` and ``mean_compression`` (fp32 bytes over the median
        and the mean), ``collective_calls_per_step``, ``ms_per_step``, ``wall_s``,
        ``replicas_in_sync`` and ``train_loss_curve`` (mean loss per step).

    Raises:
        ValueError: on an unknown method or bad settings.
        RuntimeError: if a pycomm method is asked for and ``pycomm.register``
            is missing.
        torch.multiprocessing.ProcessRaisedException: if a worker fails.
    """
    cfg = replace(config or DemoConfig(), workers=workers, steps=steps)
    resolved = _resolve(methods)
    stream = out if out is not None else sys.stdout
    if verbose:
        n_params = CharTransformer(cfg.model).num_parameters()
        print(
            f"pycomm demo: {len(resolved)} method(s), {cfg.workers} workers, {cfg.steps} steps, "
            f"batch {cfg.batch_size}x{cfg.model.context} bytes/worker, {n_params:,} parameters",
            file=stream,
            flush=True,
        )

    # workers re-create the parent's logging set-up, if it has one
    root = logging.getLogger()
    log_level = root.getEffectiveLevel() if root.handlers else None
    mp_ctx = mp.get_context("spawn")
    messages = mp_ctx.SimpleQueue()
    port = _free_port()
    logger.info("starting %d workers on 127.0.0.1:%d", cfg.workers, port)
    procs = mp.start_processes(
        _worker,
        args=(cfg.workers, port, cfg, resolved, messages, log_level),
        nprocs=cfg.workers,
        join=False,
        start_method="spawn",
    )
    results: list[dict[str, Any]] = []

    def drain() -> None:
        while not messages.empty():
            kind, payload = messages.get()
            if kind == "result":
                results.append(payload)
                if verbose:
                    print(_progress_line(len(results), len(resolved), payload), file=stream, flush=True)

    try:
        while not procs.join(timeout=0.2):
            drain()
    finally:
        drain()
        for proc in procs.processes:  # only reached with live workers if join raised
            if proc.is_alive():
                proc.terminate()
    if len(results) != len(resolved):
        raise RuntimeError(f"expected {len(resolved)} results, got {len(results)}")

    if verbose:
        print("", file=stream)
        print(format_table(results), file=stream, flush=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump({"config": cfg.to_dict(), "results": results}, fh, indent=2)
        logger.info("wrote %s", json_path)
    return results

"""The benchmark's methods: how each one attaches to DDP and which optimizer it trains with."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook, quantization_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from pycomm.bench.config import PARALLELS, SPSA_EPS, BenchConfig
from pycomm.bench.parallel import (attach_fsdp, attach_fsdp_quant, attach_hsdp, attach_hsdp_quant,
                                   hsdp_unavailable_reason)

__all__ = ["OPTIMIZERS", "MethodSpec", "torch_hook", "powersgd_method", "pycomm_method", "spsa_method",
           "bf16_hook_unavailable_reason", "single_bucket_cap_mb", "POWERSGD_NOTE", "PROJECTION_DIRECTIONS",
           "DGC_WARMUP_FRACTION", "dgc_warmup_stage_steps", "fsdp_method", "hsdp_method", "METHODS",
           "DEFAULT_METHODS", "DEFAULT_METHODS_BY_PARALLEL", "check_parallel"]


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
            ``"spsa"`` optimizer, which trains without DDP. For a sharded method
            (:attr:`parallel` ``"fsdp"`` or ``"hsdp"``) it is ``attach(model, mesh, config)``
            instead, on the plain model and the run's device mesh: it applies ``fully_shard``
            itself (see :mod:`pycomm.bench.parallel`).
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
        single_bucket: DDP is built with one gradient bucket (``bucket_cap_mb`` at least the
            model's gradient size, see :meth:`ddp_bucket_cap_mb`), whatever the run's
            ``bucket_cap_mb``. PowerSGD needs it on Gloo (see :data:`POWERSGD_NOTE`).
        unavailable: a picklable ``unavailable() -> reason or None``, asked before the run: a
            reason reports the method as unavailable instead of running it.
        note: a line the report prints under the table (the configuration a reader must know).
        parallel: the run kind it belongs to (:data:`~pycomm.bench.config.PARALLELS`): ``"ddp"``,
            ``"fsdp"`` or ``"hsdp"``; a run (``BenchConfig.parallel``) takes only its own kind.
    """

    attach: Optional[Callable[[DDP, "BenchConfig"], Any]]
    description: str
    needs_pycomm: bool = False
    pycomm_name: Optional[str] = None
    optimizer: str = "adamw"
    lr: Optional[float] = None
    clip_in_hook: bool = False
    eps: float = 1e-3
    single_bucket: bool = False
    unavailable: Optional[Callable[[], Optional[str]]] = None
    note: Optional[str] = None
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel must be one of {PARALLELS}, got {self.parallel!r}")
        if self.parallel != "ddp" and (self.zeroth_order or self.single_bucket):
            raise ValueError("a sharded method (parallel 'fsdp' or 'hsdp') has a backward pass and no DDP bucket: "
                             "optimizer 'spsa' and single_bucket are for DDP methods")
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

    def ddp_bucket_cap_mb(self, cfg: "BenchConfig", model: torch.nn.Module) -> Optional[float]:
        """The ``bucket_cap_mb`` to build DDP with: ``cfg.bucket_cap_mb``, or for a :attr:`single_bucket`
        method a cap that holds all of ``model``'s gradients in one bucket."""
        if not self.single_bucket:
            return cfg.bucket_cap_mb
        return max(cfg.bucket_cap_mb or 0.0, single_bucket_cap_mb(model))

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


def single_bucket_cap_mb(model: torch.nn.Module) -> float:
    """A DDP ``bucket_cap_mb`` (MiB) that puts all of ``model``'s gradients in one bucket (one MiB to spare)."""
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return float(grad_bytes // 2**20 + 1)


#: How the PowerSGD anchors are configured, and why (the report prints it under the table).
POWERSGD_NOTE: str = (
    "powersgd*: torch powerSGD_hook unchanged (start_powerSGD_iter=2, error feedback and warm start on), with "
    "all gradients in ONE DDP bucket (bucket_cap_mb >= model size). With several buckets it hangs or mixes "
    "buckets on Gloo: the hook issues the P and Q all-reduces from future callbacks, which run on Gloo's "
    "worker threads in a different order on each rank and block them in wait() (docs/benchmarks.md)")


def _one_bucket_powersgd_hook(state, bucket):  # type: ignore[no-untyped-def]
    """torch's ``powerSGD_hook``, refusing to run on more than one bucket instead of hanging in Gloo.

    Unannotated on purpose: DDP compares a hook's annotations with the classes themselves, and this module's
    ``from __future__ import annotations`` would turn them into strings that it rejects.
    """
    if bucket.index() != 0 or not bucket.is_last():
        raise RuntimeError(
            f"the PowerSGD anchor needs all gradients in one DDP bucket, got bucket {bucket.index()} of several: "
            "torch's powerSGD_hook issues collectives from future callbacks, which Gloo orders differently on "
            "each rank (hang or mixed buckets); build DDP with MethodSpec.ddp_bucket_cap_mb")
    return powerSGD_hook.powerSGD_hook(state, bucket)


def _attach_powersgd(rank: int, ddp: DDP, cfg: "BenchConfig") -> Any:
    # compression from iteration 2 (the earliest PyTorch allows with error feedback), not its default 1000
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                        random_seed=cfg.seed)
    ddp.register_comm_hook(state, _one_bucket_powersgd_hook)
    return state


def bf16_hook_unavailable_reason() -> Optional[str]:
    """Why DDP refuses ``bf16_compress_hook`` in this torch build, or None where it accepts it.

    The condition is DDP's own (``DistributedDataParallel._check_comm_hook``): a CUDA (or ROCm) build with
    NCCL >= 2.10, or XPU with XCCL. It does not depend on the backend: Gloo all-reduces bf16 tensors, but a
    CPU-only torch cannot register the hook at all.
    """
    gpu_build = torch.version.cuda is not None or torch.version.hip is not None
    nccl = dist.is_available() and dist.is_nccl_available() and torch.cuda.nccl.version() >= (2, 10)
    xccl = dist.is_available() and dist.is_xccl_available() and torch.xpu.is_available()
    if (gpu_build and nccl) or xccl:
        return None
    return (f"torch {torch.__version__} DDP refuses bf16_compress_hook (TypeError: BF16 all reduce communication "
            "hook required CUDA 11+ and NCCL 2.10+ or XPU and XCCL); it checks the build, not the backend: Gloo "
            "itself all-reduces bf16")


def _attach_pycomm(name: str, kwargs: Mapping[str, Any],
                   config_options: Optional[Callable[["BenchConfig"], Mapping[str, Any]]],
                   ddp: DDP, cfg: "BenchConfig") -> Any:
    import pycomm

    options = dict(kwargs)
    if config_options is not None:
        options.update(config_options(cfg))
    if cfg.hierarchy is not None:  # the run's --hierarchy, for every pycomm method alike
        options["hierarchy"] = cfg.hierarchy
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
    """PyTorch's ``powerSGD_hook`` at ``matrix_approximation_rank=rank``, compressing from iteration 2, with all
    gradients in one DDP bucket (the configuration in which it runs on Gloo, see :data:`POWERSGD_NOTE`)."""
    return MethodSpec(attach=functools.partial(_attach_powersgd, rank),
                      description=f"torch powerSGD_hook(rank={rank}, start_powerSGD_iter=2), one DDP bucket",
                      single_bucket=True, note=POWERSGD_NOTE)


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

#: Fraction of the run that DGC's density warm-up spans: the paper's ImageNet schedule, 4 warm-up epochs of 90
#: (its other runs warm up for less: 4 of 164 epochs on CIFAR-10, 1 of 40 on Penn Treebank). The one place the
#: rule lives; docs/dgc.md "How to choose density, warm-up and learning rate" states it for users.
DGC_WARMUP_FRACTION: Fraction = Fraction(4, 90)


def dgc_warmup_stage_steps(steps: int) -> int:
    """Steps per DGC warm-up stage (``DGCState(warmup_steps=...)``) for a run of ``steps`` optimizer steps.

    The paper's warm-up, scaled to the run: its 4 stages (densities 25%, 6.25%, 1.5625%, 0.4%, then the
    target) span :data:`DGC_WARMUP_FRACTION` of the steps, so each stage lasts ``steps / 90`` steps rounded half
    up, one "epoch" of a run cut into the paper's 90. Runs shorter than 45 steps get no warm-up (a stage would be
    under half a step).
    """
    from pycomm.hooks.dgc import PAPER_WARMUP_DENSITIES

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return math.floor(steps * DGC_WARMUP_FRACTION / len(PAPER_WARMUP_DENSITIES) + Fraction(1, 2))  # exact


def _dgc_options(cfg: "BenchConfig") -> dict[str, Any]:
    """DGC options that follow the run: the paper's density warm-up scaled to its length
    (:func:`dgc_warmup_stage_steps`), and local clipping at the run's threshold (scaled by ``W^-1/2`` in the hook)."""
    return {"warmup_steps": dgc_warmup_stage_steps(cfg.steps),
            "clip_norm": cfg.grad_clip if cfg.grad_clip > 0 else None}


def _topk_ef_options(cfg: "BenchConfig") -> dict[str, Any]:
    """Options of top-k with error feedback under AdamW: DGC's warm-up, no clipping in the hook (the loop clips
    the averaged gradient, as for the AdamW baseline)."""
    return {"warmup_steps": dgc_warmup_stage_steps(cfg.steps)}


def _lgreco_options(cfg: "BenchConfig") -> dict[str, Any]:
    """L-GreCo's schedule scaled to the run (its defaults, a first solve at step 1000 and one per 1000 steps,
    would never solve in a benchmark): the uniform default until ~20% of the steps, then a solve every ~25%,
    each on the gradients of the last ``min(10, steps // 10)`` steps.

    A steady-state timing run (``cfg.steady_state``) solves once, at the end of the last step that the
    inner hook sends uncompressed (``QuantState``/``DGCState`` ``start_iter``, 2 here), and never again, so
    the timed median is a step with per-layer settings and no solve in it. (Scaled to a 5-step run, the
    schedule above would solve after every step from the third, and the median would time the solver.)"""
    if cfg.steady_state:
        return {"acc_steps": 1, "start_iter": 2, "period": cfg.steps + 1}
    acc_steps = max(1, min(10, cfg.steps // 10))
    return {"acc_steps": acc_steps, "start_iter": max(acc_steps + 2, cfg.steps // 5),
            "period": max(acc_steps, cfg.steps // 4)}


def _lgreco_topk_options(cfg: "BenchConfig") -> dict[str, Any]:
    """:func:`_lgreco_options` plus DGC's run-dependent options (its inner state is DGC's)."""
    return {**_dgc_options(cfg), **_lgreco_options(cfg)}


def fsdp_method(bits: Optional[int] = None) -> MethodSpec:
    """FSDP2 over all workers: uncompressed (``bits=None``), or with :func:`pycomm.fsdp.compress` at ``bits`` bits
    (stochastic rounding, worker error feedback); AdamW, clipped after the backward pass like the DDP rows."""
    if bits is None:
        return MethodSpec(attach=attach_fsdp, parallel="fsdp",
                          description="FSDP2 fully_shard (per block and root), PyTorch's reduce-scatter, fp32")
    return MethodSpec(attach=functools.partial(attach_fsdp_quant, bits), parallel="fsdp", needs_pycomm=True,
                      pycomm_name="quant",
                      description=f"FSDP2 + pycomm.fsdp.compress(bits={bits}, error_feedback=True): quantized "
                      "reduce-scatter (all_to_all_single of the peers' chunks)")


def hsdp_method(bits: Optional[int] = None) -> MethodSpec:
    """HSDP: PyTorch's own on a 2-D mesh (``bits=None``), or FSDP2 on the shard groups with
    ``pycomm.hsdp.compress_replicas`` at ``bits`` bits (error feedback) across the replicas; AdamW."""
    if bits is None:
        return MethodSpec(attach=attach_hsdp, parallel="hsdp",
                          description="PyTorch HSDP (fully_shard on a 2-D replicate x shard mesh), uncompressed")
    return MethodSpec(attach=functools.partial(attach_hsdp_quant, bits), parallel="hsdp", needs_pycomm=True,
                      unavailable=hsdp_unavailable_reason,
                      description=f"FSDP2 on each shard group + pycomm.hsdp.compress_replicas(bits={bits}, "
                      "error_feedback=True) across replicas")


#: Method name -> :class:`MethodSpec`: the one table behind ``pycomm bench e2e`` and ``pycomm demo``.
METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        "allreduce": torch_hook(default_hooks.allreduce_hook,
                                "fp32 ring all-reduce (torch allreduce_hook), DDP default"),
        "fp16": torch_hook(default_hooks.fp16_compress_hook, "fp16 all-reduce (torch fp16_compress_hook)"),
        "bf16": replace(torch_hook(default_hooks.bf16_compress_hook, "bf16 all-reduce (torch bf16_compress_hook)"),
                        unavailable=bf16_hook_unavailable_reason),
        "powersgd1": powersgd_method(1),
        "powersgd2": powersgd_method(2),
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
                          description="pycomm dgc(density=0.001, momentum=0.9), the paper's warm-up over 4/90 of the "
                          "steps, local clipping; SGD momentum 0"),
            optimizer="sgd", clip_in_hook=True),
        # top-k with error feedback under AdamW: DGC's hook without momentum correction (an SGD construction);
        # the optimizer keeps its own momentum and second moment (docs/dgc.md "With AdamW")
        "topk-ef-adamw": pycomm_method("dgc", density=0.001, momentum=0.0, config_options=_topk_ef_options,
                                       description="pycomm dgc(density=0.001, momentum=0): top-k with error "
                                       "feedback, the paper's warm-up over 4/90 of the steps; AdamW"),
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
        # sharded runs (--parallel fsdp / hsdp): uncompressed, then pycomm at 8, 4 and 2 bits with error feedback
        "fsdp": fsdp_method(),
        "fsdp-quant8": fsdp_method(8),
        "fsdp-quant4": fsdp_method(4),
        "fsdp-quant2": fsdp_method(2),
        "hsdp": hsdp_method(),
        "hsdp-quant8": hsdp_method(8),
        "hsdp-quant4": hsdp_method(4),
        "hsdp-quant2": hsdp_method(2),
    }
)

#: Methods of ``pycomm bench e2e`` when none are named (the issue's comparison).
DEFAULT_METHODS: tuple[str, ...] = (
    "allreduce", "fp16", "bf16", "powersgd1", "powersgd2", "powersgd4", "torch-quant", "quant8", "quant4", "quant2", "dgc",
    "topk-ef-adamw", "lgreco-quant", "lgreco-topk", "spsa-projection",
)

#: Methods when none are named, per ``BenchConfig.parallel`` (``"ddp"``: :data:`DEFAULT_METHODS`).
DEFAULT_METHODS_BY_PARALLEL: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "ddp": DEFAULT_METHODS,
    "fsdp": ("fsdp", "fsdp-quant8", "fsdp-quant4", "fsdp-quant2"),
    "hsdp": ("hsdp", "hsdp-quant8", "hsdp-quant4", "hsdp-quant2"),
})


def check_parallel(methods: Iterable[tuple[str, MethodSpec]], parallel: str) -> None:
    """Raise ValueError, naming them and the run's kind, when some ``(name, spec)`` is not a ``parallel`` method."""
    wrong = [f"{name} ({spec.parallel})" for name, spec in methods if spec.parallel != parallel]
    if wrong:
        right = ", ".join(name for name, spec in METHODS.items() if spec.parallel == parallel)
        raise ValueError(f"method(s) {', '.join(wrong)} cannot run with --parallel {parallel}: a run trains one "
                         f"kind; {parallel} methods: {right}")

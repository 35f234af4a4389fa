"""DDP communication hook: Deep Gradient Compression (top-k with momentum correction)."""

# No `from __future__ import annotations`: DDP inspects the hook's real annotations.

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from pycomm import ops
from pycomm.hooks import agreement
from pycomm.hooks import hierarchy as _hierarchy
from pycomm.hooks.hook_state import (BucketPlan, HookState, Layer, advance_step, allreduce_dense, average_,
                                     bucket_pieces, completed_future, compressible, piece_slices,
                                     put_dense, same_layout_plan, split_pieces, take_dense, validated_layer_params)
from pycomm.hooks.param_state import ParamStore, export_slices, load_slices, log_skipped, report_mismatch
from pycomm.compressors import DGC
from pycomm.hooks.index_errors import IndexErrors as _IndexErrors
from pycomm.distributed import all_gather_into_tensor, mix_seed

__all__ = ["DGCState", "dgc_hook", "PAPER_WARMUP_DENSITIES"]

logger = logging.getLogger(__name__)

# Lin et al.: sparsity 75%, 93.75%, 98.4375%, 99.6%, then the target (99.9%).
PAPER_WARMUP_DENSITIES = (0.25, 0.0625, 0.015625, 0.004)


@dataclass
class _DGCPlan(BucketPlan):
    compressor: DGC                 # u and v over the whole buffer (u of dense layers is their momentum)
    where: dict = field(default_factory=dict)  # parameter name -> its piece (hook_state.piece_slices)
    segments: Optional[torch.Tensor] = None  # segment table of the compressed layers (on the buffer's device)
    host_segments: Optional[torch.Tensor] = None  # its CPU copy: the CUDA top-k sizes its output without waiting
    counts: dict = field(default_factory=dict)  # density -> k of the whole bucket
    # Per-layer densities (DGCState.set_layer_params): the override of each compressed layer
    # (None: the default), as of the state's layer-parameter version, and the 3-column segment
    # tables (device table, CPU copy or None) built so far, by per-layer counts.
    layer_version: int = -1
    layer_densities: list = field(default_factory=list)
    has_layer_densities: bool = False
    layer_tables: dict = field(default_factory=dict)
    compressed: list[tuple[int, int]] = field(init=False)  # the compressed layers' (offset, length)

    def __post_init__(self) -> None:
        self.compressed = [(o, n) for _, o, n, _ in self.layers]

    def export(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """u and v of ``names`` as standalone tensors."""
        return export_slices(self.where, {"u": self.compressor.u, "v": self.compressor.v}, names)

    def load(self, taken: dict[str, dict[str, torch.Tensor]]) -> None:
        """Put u and v of parameters that were elsewhere (another layout, a checkpoint) in place."""
        load_slices(self.where, {"u": self.compressor.u, "v": self.compressor.v}, taken)


def _validated_density(key: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"density of layer {key!r} must be a number in (0, 1], got {value!r}")
    return float(value)


class DGCState(HookState):
    """State of :func:`dgc_hook`.

    Momentum lives in the hook, so use plain SGD (``momentum=0``) as the optimizer; weight
    decay stays in the optimizer and is applied locally, uncommunicated.

    Args:
        process_group: the group (None: the default group).
        density: fraction of each compressed layer sent per step (0.001 = 0.1%).
        momentum: momentum factor m of the momentum correction.
        nesterov: Nesterov momentum correction.
        clip_norm: local gradient clipping: each layer's local gradient is clipped to
            ``clip_norm * W^-1/2`` before accumulation (None: no clipping).
        sample_ratio: fraction of elements sampled to find the top-k threshold.
        exact: exact top-k instead of the sampled search.
        momentum_masking: zero the momentum at the sent positions (the paper's default).
        warmup_steps: steps per warm-up stage; the stages use ``warmup_densities`` then ``density``.
        warmup_epochs, steps_per_epoch: the same in epochs: the warm-up spans ``warmup_epochs``
            epochs split evenly over the stages (the paper: 4 epochs, one stage each).
        warmup_densities: the warm-up schedule (default: 25%, 6.25%, 1.5625%, 0.4%).
        min_numel: layers with fewer elements, and every layer with ``dim <= 1``, go dense
            through all-reduce, with the same local momentum (``u = m*u + g_avg``).
        value_dtype: ``torch.float32`` or ``torch.float16`` for the values on the wire
            (indices travel as int32).
        seed: seed of the top-k sample.
        hierarchy: ``"flat"`` (default), ``"auto"`` or ``"node"``: in node mode each node is one DGC
            worker on each shard, see :mod:`pycomm.hooks.hierarchy`.

    Per-layer densities (for L-GreCo): :meth:`set_layer_params` maps compressed layers, by
    parameter name, to their own density inside the same bucket (still one top-k launch per
    bucket, and one fixed-size payload sized from the per-layer counts
    ``pycomm.ops.topk_count(numel, density)``). During warm-up such a layer uses
    ``max(warm-up density, its density)``. Every rank must make the same call at the same step.
    ``observer``, when set, is called as ``observer(v, layers)`` once per bucket per step with
    compressed layers, after momentum correction and before top-k: ``v`` is the float32
    accumulated velocity of the whole bucket (reused: copy what you keep), ``layers`` the
    compressed layers as ``(name, offset, length, offset in the parameter)`` (nonzero only for a
    piece of a parameter in node mode). A rank that skips compression of a bucket for NaN/Inf does
    not call it for that bucket. The observer is not pickled and not in :meth:`state_dict`.

    u and v belong to parameters (the state needs their names: :meth:`bind`, which
    ``pycomm.register`` calls): when DDP rebuilds its buckets, or a resumed run starts from
    another layout, each parameter's u and v move to its new bucket. The state is checkpointed per
    rank: each rank saves its own :meth:`state_dict` (u and v by parameter name, the per-layer
    densities).

    Example::

        import torch, torch.distributed as dist, pycomm
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo")              # under torchrun
        model = DDP(torch.nn.Linear(1024, 1024))
        state = pycomm.register(model, "dgc", density=0.001, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, weight_decay=1e-4)
        model(torch.randn(8, 1024)).sum().backward()
        opt.step()
    """

    _METHOD = "dgc"
    _CONFIG = ("density", "momentum", "nesterov", "clip_norm", "sample_ratio", "exact", "momentum_masking",
               "warmup_steps", "warmup_epochs", "steps_per_epoch", "warmup_densities", "min_numel", "seed")

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, density: float = 0.001,
                 momentum: float = 0.9, nesterov: bool = False, clip_norm: Optional[float] = None,
                 sample_ratio: float = 0.01, exact: bool = False, momentum_masking: bool = True,
                 warmup_steps: int = 0, warmup_epochs: int = 0, steps_per_epoch: Optional[int] = None,
                 warmup_densities: Sequence[float] = PAPER_WARMUP_DENSITIES, min_numel: int = 1024,
                 value_dtype: torch.dtype = torch.float32, seed: int = 0, hierarchy: str = "flat") -> None:
        DGC(density, momentum, nesterov, clip_norm, momentum_masking, exact, sample_ratio)  # validates
        if value_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"value_dtype must be torch.float32 or torch.float16, got {value_dtype}")
        if warmup_steps < 0 or warmup_epochs < 0 or min_numel < 0:
            raise ValueError("warmup_steps, warmup_epochs and min_numel must be >= 0")
        if warmup_epochs and not steps_per_epoch:
            raise ValueError("warmup_epochs needs steps_per_epoch")
        if any(not 0.0 < d <= 1.0 for d in warmup_densities):
            raise ValueError(f"warmup_densities must be in (0, 1], got {tuple(warmup_densities)}")
        self.process_group = process_group
        self.density = density
        self.momentum = momentum
        self.nesterov = nesterov
        self.clip_norm = clip_norm
        self.sample_ratio = sample_ratio
        self.exact = exact
        self.momentum_masking = momentum_masking
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.warmup_densities = tuple(warmup_densities)
        self.min_numel = min_numel
        self.value_dtype = value_dtype
        self.seed = seed
        self.hierarchy = _hierarchy.validated_hierarchy(hierarchy)
        self.iter = 0
        self.observer: Optional[Callable[[torch.Tensor, list[Layer]], None]] = None
        self._layer_params: dict[str, float] = {}
        self._layer_version = 0
        self._plans: dict[int, _DGCPlan] = {}
        self._store = ParamStore()
        self._index_errors = _IndexErrors()

    def raise_index_errors(self) -> None:
        """Wait for the device and raise the first out-of-range index that the hook's CUDA path
        recorded and has not raised yet (see :func:`dgc_hook`); nothing to do on CPU."""
        self._index_errors.raise_ready(wait=True)

    # -- schedule ------------------------------------------------------------
    def warmup_density(self, step: int) -> Optional[float]:
        """The warm-up stage's density at ``step``, or None after the warm-up."""
        stage_len = self.warmup_steps
        if not stage_len and self.warmup_epochs:
            stage_len = max(1, self.warmup_epochs * self.steps_per_epoch // max(1, len(self.warmup_densities)))
        if stage_len and step < stage_len * len(self.warmup_densities):
            return self.warmup_densities[step // stage_len]
        return None

    def density_at(self, step: int) -> float:
        """The density used at ``step`` by layers without their own: the warm-up stage's, never
        below the target."""
        warmup = self.warmup_density(step)
        return self.density if warmup is None else max(warmup, self.density)

    # -- per-layer densities ----------------------------------------------------
    @property
    def layer_params(self) -> dict[str, float]:
        """The per-layer densities set by :meth:`set_layer_params`, by parameter name (a copy)."""
        return dict(self._layer_params)

    def set_layer_params(self, params: Optional[Mapping[str, float]]) -> None:
        """Give compressed layers their own density, from the next time the hook sees their bucket.

        Args:
            params: ``{parameter name: density}`` with density in (0, 1]; layers not named use
                :meth:`density_at`. None (or empty) clears every override. Replaces the previous
                mapping. Every rank must call it with the same mapping at the same step: the next
                hook call checks that they did (:mod:`pycomm.hooks.agreement`).

        Raises:
            ValueError: a key that is not a name of the bound model, a density outside (0, 1], or
                a layer the hook does not compress (``dim <= 1`` or fewer than ``min_numel`` elements).
        """
        self._layer_params = self._validated_layer_params(params)
        self._layer_version += 1
        agreement.settings_changed(self)

    def _validated_layer_params(self, params: Optional[Mapping[str, float]]) -> dict[str, float]:
        checked = validated_layer_params(params, "density", _validated_density, self._names)
        if self._names is not None:
            for name in checked:
                p = self._names.params[name]
                if not compressible(p, self.min_numel):
                    raise ValueError(f"layer {name!r} is not compressed: it has shape {tuple(p.shape)}, and DGC "
                                     f"compresses layers with dim > 1 and at least min_numel={self.min_numel} "
                                     "elements")
        return checked

    def _check_bound(self) -> None:
        self._layer_params = self._validated_layer_params(self._layer_params)
        super()._check_bound()

    def _fields(self) -> dict[str, bool]:
        return {"u": True, "v": True}  # u of a dense layer is its momentum

    def _layer_counts(self, plan: _DGCPlan, step: int) -> Optional[tuple[int, ...]]:
        """Elements kept per compressed layer at ``step``, or None when no layer of the bucket has its own
        density (then the whole bucket uses :meth:`density_at`, exactly as without overrides)."""
        if plan.layer_version != self._layer_version:
            plan.layer_densities = [self._layer_params.get(name) for name, _, _, _ in plan.layers]
            plan.has_layer_densities = any(d is not None for d in plan.layer_densities)
            plan.layer_tables.clear()  # tables of earlier settings are not needed again
            plan.layer_version = self._layer_version
        if not plan.has_layer_densities:
            return None
        warmup = self.warmup_density(step)
        default = self.density_at(step)
        return tuple(ops.topk_count(n, default if d is None else d if warmup is None else max(warmup, d))
                     for (_, n), d in zip(plan.compressed, plan.layer_densities))

    def _layer_table(self, plan: _DGCPlan, counts: tuple[int, ...],
                     device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (offset, length, count) table for ``counts`` and, on CUDA, its CPU copy. Built once per
        setting; on CUDA the copy to the device is asynchronous (from pinned memory), so nothing waits."""
        table = plan.layer_tables.get(counts)
        if table is None:
            host = ops.segment_table(plan.compressed, counts=counts)
            if device.type == "cuda":
                host = host.pin_memory()
                table = (host.to(device, non_blocking=True), host)
            else:
                table = (host.to(device), None)
            plan.layer_tables[counts] = table
        return table

    # -- persistence -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the configuration, the step, the per-layer densities, and u and v of
        every parameter by name (``params[name]["u"]``, ``["v"]``, shaped like the parameter)."""
        return {**self._header(), "value_dtype": str(self.value_dtype).replace("torch.", ""),
                "layer_params": self.layer_params, "params": self._params_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` before the first step; the first hook call puts each
        parameter's u and v into whatever bucket holds it then.

        ``strict`` (default): raise :class:`~pycomm.hooks.param_state.CheckpointMismatch` at the
        first thing that does not fit (another method or setting, a name the bound model does not
        have, another shape); ``strict=False`` loads what fits and logs the rest.
        """
        skipped: list[str] = []
        self._read_header(state_dict, strict, skipped)
        saved_dtype = state_dict.get("value_dtype", "float32")
        if saved_dtype != str(self.value_dtype).replace("torch.", ""):
            report_mismatch(strict, f"the checkpoint has value_dtype={saved_dtype}, this state has "
                                    f"{self.value_dtype}", skipped)
        layer_params = state_dict.get("layer_params") or {}
        if not strict and self._names is not None:
            layer_params = {k: v for k, v in layer_params.items()
                            if k in self._names.params and compressible(self._names.params[k], self.min_numel)}
        self._load_params(state_dict, strict, skipped)
        log_skipped(self._METHOD, skipped)
        self.set_layer_params(layer_params)

    _NOT_PICKLED = HookState._NOT_PICKLED + ("_index_errors",)  # pending device checks of this process
    _UNPICKLE_DEFAULTS = {"_index_errors": _IndexErrors}

    # -- planning ----------------------------------------------------------------
    def _plan(self, bucket: dist.GradBucket) -> _DGCPlan:
        plan, signature = same_layout_plan(self, bucket)
        if plan is not None:
            return plan
        buffer, pieces = bucket.buffer(), bucket_pieces(bucket)
        names = self._require_names().names_of(p for p, _, _, _ in pieces)
        layers, dense = split_pieces(pieces, names, self.min_numel)
        where = piece_slices(names, pieces)
        compressed = [(o, n) for _, o, n, _ in layers]
        compressor = DGC(self.density, self.momentum, self.nesterov, self.clip_norm, self.momentum_masking,
                         self.exact, self.sample_ratio, self.seed)
        compressor.u = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        compressor.v = torch.zeros_like(compressor.u)
        host_segments = ops.segment_table(compressed) if compressed else None
        segments = host_segments.to(buffer.device) if compressed else None
        plan = _DGCPlan(signature, names, layers, dense, compressor, where, segments,
                        host_segments if buffer.is_cuda else None)
        plan.load(self._store.take(names))
        self._store.claim(names, plan)
        self._plans[bucket.index()] = plan
        return plan

    def _count(self, plan: _DGCPlan, density: float) -> int:
        if density not in plan.counts:
            plan.counts[density] = sum(ops.topk_count(n, density) for _, n in plan.compressed)
        return plan.counts[density]


def _pack(values: torch.Tensor, indices: torch.Tensor, flag: Union[int, torch.Tensor],
          value_dtype: torch.dtype) -> torch.Tensor:
    """One fixed-size byte payload: k values, k int32 indices, then an int32 flag (an int, or a
    one-element int32 tensor on the values' device)."""
    if isinstance(flag, torch.Tensor):
        flag_t = flag.reshape(1)
    else:  # new_full, not torch.tensor([flag], device=...): no blocking host-to-device copy on CUDA
        flag_t = values.new_full((1,), flag, dtype=torch.int32)
    return torch.cat([values.to(value_dtype).view(torch.uint8), indices.to(torch.int32).view(torch.uint8),
                      flag_t.view(torch.uint8)])


def _sync_free(buffer: torch.Tensor) -> bool:
    """Whether the hook takes its sync-free path for ``buffer``: on CUDA no value is read on the host
    (overflow handled with device-side selects, index errors raised later). Tests force it on CPU."""
    return buffer.is_cuda


def _sparse_step(state: DGCState, plan: _DGCPlan, buffer: torch.Tensor, density: float, k: int,
                 segments: torch.Tensor, host_segments: Optional[torch.Tensor], step: int, world: int) -> bool:
    """The compressed layers' step with host checks (CPU). Returns whether it fell back: then the
    whole buffer has been all-reduced uncompressed."""
    comp, group, n = plan.compressor, state.process_group, buffer.numel()
    local_bad = not bool(torch.isfinite(buffer).all())
    if local_bad:
        values = torch.zeros(k, dtype=torch.float32, device=buffer.device)
        indices = torch.zeros(k, dtype=torch.int32, device=buffer.device)
    else:
        clip = state.clip_norm / math.sqrt(world) if state.clip_norm else None
        comp.compensate(buffer, plan.segments, clip_norm=clip)
        if state.observer is not None:
            state.observer(comp.v, list(plan.layers))
        values, indices = comp.select(density, segments, seed=mix_seed(state.seed, step),
                                      host_segments=host_segments)
    payload = _pack(values, indices, int(local_bad), state.value_dtype)
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=buffer.device)
    all_gather_into_tensor(gathered, payload, group=group)
    rows = gathered.view(world, -1)
    value_bytes = k * state.value_dtype.itemsize
    flags = rows[:, value_bytes + 4 * k:].contiguous().view(torch.int32)
    if bool(flags.any()):
        average_(buffer, group, world)
        return True
    comp.mask(indices)
    all_values = rows[:, :value_bytes].contiguous().view(state.value_dtype)
    all_indices = rows[:, value_bytes:value_bytes + 4 * k].contiguous().view(torch.int32)
    dense = ops.densify(all_values, all_indices, n)
    buffer.copy_(dense.div_(world))
    return False


def _sparse_step_sync_free(state: DGCState, plan: _DGCPlan, buffer: torch.Tensor, density: float, k: int,
                           segments: torch.Tensor, host_segments: Optional[torch.Tensor], step: int,
                           world: int) -> torch.Tensor:
    """The compressed layers' step without reading a value on the host (CUDA).

    The same outcome as :func:`_sparse_step` for the accumulators, chosen on the device: a rank
    whose bucket holds NaN/Inf keeps ``u`` and ``v`` as they were; when any rank flagged one (or a
    payload held an index out of range), the others keep what they accumulated, unmasked. The
    bucket is then NaN on every rank instead of the uncompressed average (GradScaler skips the
    step either way). Returns the device bool "this step fell back", for the dense layers.
    """
    comp, group, n = plan.compressor, state.process_group, buffer.numel()
    finite = torch.isfinite(buffer).all()
    old_u, old_v = comp.u.clone(), comp.v.clone()
    clip = state.clip_norm / math.sqrt(world) if state.clip_norm else None
    comp.compensate(buffer, plan.segments, clip_norm=clip)
    if state.observer is not None:  # a non-finite step shows the observer the velocity it leaves: the old one
        state.observer(torch.where(finite, comp.v, old_v), list(plan.layers))
    values, indices = comp.select(density, segments, seed=mix_seed(state.seed, step),
                                  host_segments=host_segments)
    payload = _pack(values, indices, (~finite).to(torch.int32), state.value_dtype)
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=buffer.device)
    all_gather_into_tensor(gathered, payload, group=group)
    rows = gathered.view(world, -1)
    value_bytes = k * state.value_dtype.itemsize
    all_values = rows[:, :value_bytes].contiguous().view(state.value_dtype)
    all_indices = rows[:, value_bytes:value_bytes + 4 * k].contiguous().view(torch.int32)
    first_bad = torch.empty(2, dtype=torch.int64, device=buffer.device)
    kept_u = comp.u[indices]  # what the mask zeroes, restored when the step falls back
    kept_v = comp.v[indices]
    comp.mask(indices, first_bad=first_bad[0:1])  # our own top-k: in range (checked without waiting)
    dense = ops.densify(all_values, all_indices, n, first_bad=first_bad[1:2])
    state._index_errors.record(first_bad, [
        ("this rank's top-k", indices, n, "nothing was masked in that step"),
        ("a peer's payload", all_indices, n, "that step's bucket was set to NaN and the accumulators kept unmasked")])
    fell_back = (rows[:, value_bytes + 4 * k:].contiguous().view(torch.int32) != 0).any() | (first_bad[1] >= 0)
    comp.u.index_put_((indices,), torch.where(fell_back, kept_u, comp.u[indices]))
    comp.v.index_put_((indices,), torch.where(fell_back, kept_v, comp.v[indices]))
    comp.u.copy_(torch.where(finite, comp.u, old_u))
    comp.v.copy_(torch.where(finite, comp.v, old_v))
    buffer.copy_(torch.where(fell_back, torch.full_like(dense, math.nan), dense.div_(world)))
    return fell_back


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP bucket with DGC (see :class:`DGCState`).

    Per bucket: momentum correction (with clipping), top-k selection per layer, one
    ``all_gather`` of a fixed-size payload (k values + k int32 indices + a flag, so Gloo never
    sees empty or ragged tensors), densify (indices validated), divide by W. k is the sum of the
    layers' counts, each at the default density or at the layer's own (:meth:`DGCState.set_layer_params`). Small and 1-D
    layers are all-reduced densely with the same local momentum. Register with
    ``pycomm.register(ddp_model, "dgc", density=0.001)``.

    A bucket with NaN/Inf on any rank (seen by every rank through the flag) leaves the
    accumulators of the rank that holds it untouched; the other ranks keep what they
    accumulated (nothing is masked away), so no gradient is lost. On CPU the bucket is then
    all-reduced uncompressed (the exact overflow reaches AMP's GradScaler). On CUDA, where that
    decision would wait for the device, the same accumulator updates are chosen on the device
    and the bucket is NaN on every rank, which GradScaler detects just the same.

    Indices received from peers are validated. On CPU an index out of range raises at once. On
    CUDA (no wait for the device) that bucket's step is treated like an overflow step (NaN
    bucket, accumulators kept unmasked) and the ``RuntimeError`` is raised by the first call of
    this hook, for any bucket, that starts after the device has finished that step's densify
    (normally the next step); :meth:`DGCState.raise_index_errors` waits and raises at once.
    """
    state._require_names()
    agreement.check_settings(state, bucket, "dgc")
    if (routed := _hierarchy.route(state, bucket, dgc_hook)) is not None:  # node mode
        return routed
    group = state.process_group
    buffer = bucket.buffer()
    world = dist.get_world_size(group)
    step = advance_step(state, bucket)
    sync_free = _sync_free(buffer)
    state._index_errors.raise_ready()
    plan = state._plan(bucket)

    small = take_dense(buffer, plan.dense)
    small = None if small is None else small.float()
    fallback: Union[bool, torch.Tensor] = False
    if plan.segments is not None:
        counts = state._layer_counts(plan, step)
        if counts is None:
            density = state.density_at(step)
            k = state._count(plan, density)
            select_segments, select_host_segments = plan.segments, plan.host_segments
        else:  # per-layer counts in the table's third column; the density argument is then unused
            density = 1.0
            k = sum(counts)
            select_segments, select_host_segments = state._layer_table(plan, counts, buffer.device)
        sparse_step = _sparse_step_sync_free if sync_free else _sparse_step
        fallback = sparse_step(state, plan, buffer, density, k, select_segments, select_host_segments, step, world)
    if small is not None and fallback is not True:  # every rank agrees on fallback (it saw the same flags)
        allreduce_dense(buffer, plan.dense, small, group, world,
                        transform=lambda average: _dense_momentum(state, plan, average, fallback, sync_free))
    elif plan.segments is None:
        average_(buffer, group, world)
    return completed_future(buffer)


def _dense_momentum(state: DGCState, plan: _DGCPlan, average: torch.Tensor, fallback: Union[bool, torch.Tensor],
                    sync_free: bool) -> torch.Tensor:
    """The dense layers' local momentum on their all-reduced ``average`` (concatenated): updates their
    ``u`` and returns what the buffer receives."""
    # A non-finite average (seen identically by every rank) passes through untouched, and so
    # does the average of a step that fell back on the device (as the uncompressed one would).
    update: Union[bool, torch.Tensor] = torch.isfinite(average).all()
    if not sync_free:
        update = bool(update)
    elif isinstance(fallback, torch.Tensor):
        update = update & ~fallback
    if update is False:
        return average
    u = take_dense(plan.compressor.u, plan.dense)
    if state.nesterov:
        new_u = (u + average) * state.momentum
        out = new_u + average
    else:
        new_u = u * state.momentum + average
        out = new_u
    if update is not True:  # a device bool: select without waiting
        out = torch.where(update, out, average)
        new_u = torch.where(update, new_u, u)
    put_dense(plan.compressor.u, plan.dense, new_u)
    return out

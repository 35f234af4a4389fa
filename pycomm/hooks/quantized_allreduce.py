"""DDP communication hook: quantized scatter-reduce-allgather with error feedback."""

# No `from __future__ import annotations`: DDP inspects the hook's real annotations.

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from pycomm import ops
from pycomm.ops.validation import check_bits_bucket
from pycomm.hooks import agreement
from pycomm.hooks.hook_state import (BucketPlan, Dense, HookState, Layer, advance_step, allreduce_dense,
                                     average_async, bucket_signature, split_layers, take_dense, validated_layer_params)
from pycomm.distributed import chunk_layout, mix_seed, quantized_all_reduce

__all__ = ["QuantState", "quantized_allreduce_hook"]

logger = logging.getLogger(__name__)


@dataclass
class _QuantPlan(BucketPlan):
    """How one DDP bucket is split between the quantized and the plain path."""

    table: Optional[torch.Tensor] = None            # bucket table over the compressed layers, or None
    worker_residual: Optional[torch.Tensor] = None  # float32, numel of the bucket buffer
    server_residual: Optional[torch.Tensor] = None  # float32, buckets_per_chunk * bucket_size
    layer_bits: tuple[int, ...] = ()         # bits of each compressed layer
    bits: int = 0                            # bits of the 2-column path; 0: `table` is mixed
    host_table: Optional[torch.Tensor] = None  # CPU copy of a mixed table (sizes payloads, no wait)
    params_version: int = 0                  # QuantState's layer-params version it was built for


def _validated_bits(key: tuple[int, int], value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(f"bits of layer {key} must be an integer in [1, 8], got {value!r}")
    return int(value)


_Observer = Callable[[int, torch.Tensor, list[Layer]], None]


class QuantState(HookState):
    """State of :func:`quantized_allreduce_hook`.

    Args:
        process_group: the group to reduce over (None: the default group).
        bits: bits per element, 1..8.
        bucket_size: elements per quantization bucket (a multiple of 8). Each layer gets its own buckets.
        stochastic: unbiased stochastic rounding; otherwise round to nearest.
        error_feedback: keep the worker residual (first quantization) and the "server" residual
            (re-quantization of this rank's reduced chunk) and add them back the next step.
        start_iter: iterations run with plain all-reduce before compression starts. The default
            also skips DDP's first iteration, after which DDP rebuilds its buckets.
        min_numel: layers with fewer elements, and every layer with ``dim <= 1`` (biases, norms),
            are all-reduced uncompressed.
        seed: base seed of stochastic rounding (mixed with the step, the bucket and the rank).

    Per-layer bit widths (for L-GreCo): :meth:`set_layer_params` maps a compressed layer
    ``(bucket.index(), position in bucket.parameters())`` to its bits; layers without an entry
    use ``bits``. A DDP bucket whose layers differ is sent with a mixed bucket table (one kernel
    launch per phase, the same two collectives). ``observer``, when set, is called as
    ``observer(bucket_index, values, layers)`` once per bucket per compressed step, before
    compressing: ``values`` is a float32 tensor of the bucket's numel holding exactly what is
    quantized (buffer + worker residual; copy what you keep), ``layers`` the compressed layers as
    ``(position, offset, length)``. It is not pickled and not in :meth:`state_dict`.

    Residuals are per rank: checkpoint each rank's :meth:`state_dict` (e.g. to
    ``f"quant_rank{rank}.pt"``) and load it on the same rank. Pickling the state
    (``__getstate__``) drops the process group; it is set to the default group on load.

    Example::

        import torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from pycomm.hooks import QuantState, quantized_allreduce_hook

        dist.init_process_group("gloo")          # run under torchrun
        model = DDP(torch.nn.Linear(1024, 1024))
        state = QuantState(bits=4)
        model.register_comm_hook(state, quantized_allreduce_hook)
        model(torch.randn(8, 1024)).sum().backward()
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, bits: int = 4, bucket_size: int = 512,
                 stochastic: bool = True, error_feedback: bool = True, start_iter: int = 2, min_numel: int = 1024,
                 seed: int = 0) -> None:
        check_bits_bucket(bits, bucket_size)
        if start_iter < 0 or min_numel < 0:
            raise ValueError(f"start_iter and min_numel must be >= 0, got {start_iter} and {min_numel}")
        self.process_group = process_group
        self.bits = bits
        self.bucket_size = bucket_size
        self.stochastic = stochastic
        self.error_feedback = error_feedback
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.seed = seed
        self.iter = 0
        self.observer: Optional[_Observer] = None
        self._layer_params: dict[tuple[int, int], int] = {}
        self._params_version = 0
        self._plans: dict[int, _QuantPlan] = {}
        self._pending: dict[int, dict[str, Any]] = {}  # residuals loaded before their bucket is seen

    # -- per-layer bit widths ------------------------------------------------
    @property
    def layer_params(self) -> dict[tuple[int, int], int]:
        """The per-layer bits overrides, ``{(bucket_index, position): bits}`` (a copy)."""
        return dict(self._layer_params)

    def set_layer_params(self, params: Optional[dict[tuple[int, int], int]]) -> None:
        """Set per-layer bits: ``{(bucket_index, position): bits}`` with bits in 1..8; None clears.

        Layers without an entry use ``bits``; entries of layers that are not compressed (``dim <= 1``
        or fewer than ``min_numel`` elements) have no effect. Takes effect the next time the hook
        sees each bucket; a bucket whose layers' bits changed keeps its worker residuals and resets
        its server residual (whose layout follows the bits). Every rank must set the same mapping
        at the same step: the next hook call checks that they did (one tiny collective, see
        :mod:`pycomm.hooks.agreement`) and raises ``RankDisagreementError`` on every rank if not.
        """
        self._layer_params = self._validated_layer_params(params)
        self._params_version += 1
        agreement.settings_changed(self)

    @staticmethod
    def _validated_layer_params(params: Optional[dict]) -> dict[tuple[int, int], int]:
        return validated_layer_params(params, "bits", _validated_bits)

    _UNPICKLE_DEFAULTS = {"_layer_params": dict, "_params_version": int}  # pickles from before per-layer bits

    # -- persistence -------------------------------------------------------
    _CONFIG = ("bits", "bucket_size", "stochastic", "error_feedback", "start_iter", "min_numel", "seed", "iter")

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: configuration, iteration and its own residuals per DDP bucket."""
        residuals = {
            index: {"signature": plan.signature, "worker": plan.worker_residual, "server": plan.server_residual,
                    "layer_bits": plan.layer_bits}
            for index, plan in self._plans.items()
        }
        return {**self._config_state(), "residuals": residuals,
                "layer_params": dict(self._layer_params)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; residuals are matched to buckets when the hook next sees them.

        Checkpoints written before per-layer bits existed load too (no overrides)."""
        self._load_config(state_dict)
        self._layer_params = self._validated_layer_params(state_dict.get("layer_params") or None)
        self._params_version += 1
        self._plans.clear()
        self._pending = dict(state_dict.get("residuals", {}))
        agreement.settings_changed(self)

    # -- planning ------------------------------------------------------------
    def _plan(self, bucket: dist.GradBucket) -> _QuantPlan:
        buffer = bucket.buffer()
        index = bucket.index()
        plan = self._plans.get(index)
        if plan is not None and plan.params_version == self._params_version:
            if plan.signature[0] == buffer.numel() and plan.signature[1] == buffer.dtype:
                # The same layout is the overwhelmingly common case: compare the shapes only then.
                if plan.signature[2] == tuple(tuple(p.shape) for p in bucket.parameters()):
                    return plan
        params = bucket.parameters()
        signature = bucket_signature(buffer, params)
        layers, dense = split_layers(params, self.min_numel)
        layer_bits = tuple(self._layer_params.get((index, position), self.bits) for position, _, _ in layers)
        if plan is not None and plan.signature == signature:
            if plan.layer_bits == layer_bits:
                plan.params_version = self._params_version
                return plan
            # Same buffer, new bits: the worker residual (per element) keeps its meaning, the
            # server residual (laid out by the table's chunks) does not.
            logger.info("pycomm quant: bucket %d changed its layer bits; its server residual is reset", index)
            worker = plan.worker_residual
            plan = self._build_plan(bucket, signature, layers, dense, layer_bits)
            if worker is not None and plan.worker_residual is not None:
                plan.worker_residual = worker
            self._plans[index] = plan
            return plan
        if plan is not None:
            logger.info("pycomm quant: bucket %d changed layout; its residuals are reset", index)
        plan = self._build_plan(bucket, signature, layers, dense, layer_bits)
        pending = self._pending.pop(index, None)
        if pending is not None and pending["signature"] == signature:
            if pending["worker"] is not None and plan.worker_residual is not None:
                plan.worker_residual = pending["worker"].to(buffer.device)
            # Checkpoints without "layer_bits" were written with every layer at their `bits`.
            saved_bits = pending.get("layer_bits") or tuple(self.bits for _ in layers)
            server = pending["server"]
            if (server is not None and plan.server_residual is not None and tuple(saved_bits) == layer_bits
                    and server.numel() == plan.server_residual.numel()):
                plan.server_residual = server.to(buffer.device)
        self._plans[index] = plan
        return plan

    def _build_plan(self, bucket: dist.GradBucket, signature: tuple, layers: list[Layer], dense: list[Dense],
                    layer_bits: tuple[int, ...]) -> _QuantPlan:
        buffer = bucket.buffer()
        world = dist.get_world_size(self.process_group)
        table, host_table, worker, server, bits = None, None, None, None, self.bits
        if layers:
            segments = [(o, n) for _, o, n in layers]
            if len(set(layer_bits)) == 1:
                # One width for the whole bucket: the 2-column path, exactly as without overrides.
                bits = layer_bits[0]
                table = ops.bucket_table(segments, self.bucket_size, pad_to_multiple=world, device=buffer.device)
            else:
                bits = 0
                host_table = ops.bucket_table(segments, self.bucket_size, pad_to_multiple=world, bits=layer_bits)
                table = host_table.to(buffer.device)
                if not buffer.is_cuda:
                    host_table = table
            if self.error_feedback:
                _, per_chunk = chunk_layout(buffer.numel(), self.bucket_size, world, table)
                worker = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
                server = torch.zeros(per_chunk * self.bucket_size, dtype=torch.float32, device=buffer.device)
        return _QuantPlan(signature, layers, dense, table=table, worker_residual=worker, server_residual=server,
                          layer_bits=layer_bits, bits=bits, host_table=host_table, params_version=self._params_version)


def quantized_allreduce_hook(state: QuantState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP bucket across ranks, quantized (see :class:`QuantState`).

    Register with ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``
    or in one line with ``pycomm.register(ddp_model, "quant", bits=4)``.
    Layers with ``dim <= 1`` or fewer than ``min_numel`` elements, and every layer
    before ``start_iter``, are all-reduced uncompressed.
    """
    agreement.check_settings(state, bucket, "quant")
    group = state.process_group
    buffer = bucket.buffer()
    step = advance_step(state, bucket)
    if step < state.start_iter or buffer.dtype not in ops.SUPPORTED_DTYPES:
        return average_async(buffer, group)
    plan = state._plan(bucket)
    if plan.table is None:
        return average_async(buffer, group)

    world = dist.get_world_size(group)
    if state.observer is not None:
        if plan.worker_residual is not None:
            values = buffer.float() + plan.worker_residual
        else:
            values = buffer.to(torch.float32, copy=True)
        state.observer(bucket.index(), values, list(plan.layers))
    small = take_dense(buffer, plan.dense)
    fut = quantized_all_reduce(
        buffer, bits=plan.bits if plan.bits else state.bits, bucket_size=state.bucket_size, op=dist.ReduceOp.AVG,
        group=group, async_op=True, stochastic=state.stochastic, seed=mix_seed(state.seed, step, bucket.index()),
        worker_residual=plan.worker_residual, server_residual=plan.server_residual, bucket_table=plan.table,
        host_bucket_table=plan.host_table)
    if small is None:
        return fut
    # The small layers travel uncompressed, after the quantized part, and are copied back here,
    # on the caller's stream (see allreduce_dense); the future stays the collective's own.
    # The decode writes only the table's elements, never these, so the two cannot race. On CPU,
    # where an overflow makes quantized_all_reduce reduce the whole buffer uncompressed before it
    # returns, these values are written after it and win, as the same average.
    allreduce_dense(buffer, plan.dense, small, group, world)
    return fut

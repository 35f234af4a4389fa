"""DDP communication hook: quantized scatter-reduce-allgather with error feedback."""

# No `from __future__ import annotations`: DDP inspects the hook's real annotations.

import logging
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from pycomm import ops
from pycomm.ops.validation import check_bits_bucket
from pycomm.hooks import agreement
from pycomm.hooks import hierarchy as _hierarchy
from pycomm.hooks.hook_state import (BucketPlan, Dense, HookState, Layer, advance_step, allreduce_dense,
                                     average_async, bucket_pieces, completed_future, piece_slices,
                                     plan_signature, split_pieces,
                                     take_dense, validated_layer_params)
from pycomm.hooks.param_state import ParameterNames, ParamStore, export_slices, load_slices, log_skipped
from pycomm.distributed import chunk_layout, mix_seed, quantized_all_reduce

__all__ = ["QuantState", "quantized_allreduce_hook", "QuantPlan", "build_quant_plan"]

logger = logging.getLogger(__name__)


@dataclass
class QuantPlan(BucketPlan):
    """How one flat gradient buffer (a DDP bucket, an FSDP shard) is split between the quantized and
    the plain path, and the working buffers of its parameters' residuals. Build one with
    :func:`build_quant_plan`."""

    table: Optional[torch.Tensor] = None            # bucket table over the compressed layers, or None
    worker_residual: Optional[torch.Tensor] = None  # float32, numel of the bucket buffer
    server_residual: Optional[torch.Tensor] = None  # float32, buckets_per_chunk * bucket_size
    layer_bits: tuple[int, ...] = ()         # bits of each compressed layer
    bits: int = 0                            # bits of the 2-column path; 0: `table` is mixed
    host_table: Optional[torch.Tensor] = None  # CPU copy of a mixed table (sizes payloads, no wait)
    params_version: int = 0                  # QuantState's layer-params version it was built for
    world: int = 1
    rank: int = 0
    bucket_size: int = 0
    own_positions: Optional[torch.Tensor] = None  # buffer position of each server-residual element (-1: none)
    row_streams: Optional[torch.Tensor] = None  # Philox index of each table row's first element (see _row_streams)
    where: dict = field(default_factory=dict)  # compressed parameter name -> its piece (hook_state.piece_slices)

    def owned_positions(self) -> torch.Tensor:
        """For each element of the server residual, the bucket element it belongs to (-1 for the
        padding of a record): its rows are this rank's chunk of the table. Built when first needed
        (at a layout change or a checkpoint), never in a step."""
        if self.own_positions is None:
            assert self.table is not None and self.server_residual is not None
            per_chunk = self.server_residual.numel() // self.bucket_size
            table = self.host_table if self.host_table is not None else self.table
            rows = table[self.rank * per_chunk:(self.rank + 1) * per_chunk, :2].to("cpu", torch.int64)
            within = torch.arange(self.bucket_size, dtype=torch.int64)
            positions = rows[:, :1] + within
            positions[within.expand_as(positions) >= rows[:, 1:2]] = -1
            self.own_positions = positions.reshape(-1).to(self.server_residual.device)
        return self.own_positions

    def export(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The residuals of ``names`` as standalone tensors: ``worker`` (gradient units, what this
        rank has not sent yet) and ``server`` (units of the average: the re-quantization error of the
        elements of this rank's chunk; zero elsewhere)."""
        if self.worker_residual is None:
            return {}
        return export_slices(self.where, {"worker": self.worker_residual, "server": self._server_by_position()},
                             names)

    def padding_residual(self) -> torch.Tensor:
        """The server residual of the records' padding (the tail of each layer's last record): the
        reduced chunk holds decoded padding there, so the re-quantization leaves a residual that
        belongs to no parameter. It is kept per bucket layout (see ``QuantState.state_dict``)."""
        assert self.server_residual is not None
        return self.server_residual[self.owned_positions() < 0]

    def _server_by_position(self) -> torch.Tensor:
        assert self.worker_residual is not None and self.server_residual is not None
        full = torch.zeros_like(self.worker_residual)
        positions = self.owned_positions()
        valid = positions >= 0
        full[positions[valid]] = self.server_residual[valid]
        return full

    def load(self, taken: dict[str, dict[str, torch.Tensor]]) -> None:
        """Put the residuals of parameters that were elsewhere (another layout, a checkpoint) into
        this plan. Owed mass keeps its value wherever it lands: on the elements this rank now
        reduces (its chunk, which it does not quantize in the first phase) it goes into the server
        residual, as ``server + worker / W``; on the others into the worker residual, as
        ``worker + W * server``. Where the ownership did not change, one of the two is zero and the
        values are kept as they were."""
        if self.worker_residual is None or not taken:
            return
        worker = self.worker_residual
        server = torch.zeros_like(worker)
        load_slices(self.where, {"worker": worker, "server": server}, taken)
        positions = self.owned_positions()
        valid = positions >= 0
        owned = positions[valid]
        assert self.server_residual is not None
        self.server_residual[valid] = server[owned] + worker[owned] / self.world
        worker[owned] = 0.0
        not_owned_server = server.index_fill_(0, owned, 0.0)
        worker.add_(not_owned_server, alpha=self.world)


def _row_streams(table: torch.Tensor, layers: list[Layer], names: ParameterNames) -> torch.Tensor:
    """Where each table row draws its stochastic rounding: Philox index ``(parameter index << 40) +
    offset of the row's first element inside its parameter``. A layer's draws then depend on the layer
    alone, not on where DDP puts it in a bucket or which layers share the bucket, nor (node mode) on
    where a shard cuts it. (2^40 elements per parameter, 2^23 parameters.) Empty padding rows get 0
    (they draw nothing)."""
    offsets = torch.tensor([o for _, o, _, _ in layers], dtype=torch.int64)
    bases = torch.tensor([(names.indices[name] << 40) + start for name, _, _, start in layers], dtype=torch.int64)
    row_offsets = table[:, 0].to("cpu", torch.int64).contiguous()
    layer = (torch.searchsorted(offsets, row_offsets, right=True) - 1).clamp_(min=0)
    streams = bases[layer] + row_offsets - offsets[layer]
    return torch.where(table[:, 1].to("cpu") > 0, streams, 0)


def _validated_bits(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(f"bits of layer {key!r} must be an integer in [1, 8], got {value!r}")
    return int(value)


_Observer = Callable[[torch.Tensor, list[Layer]], None]


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
        seed: base seed of stochastic rounding, mixed with the step and the rank; each element draws
            at (its parameter, its offset in the parameter), so a layer's rounding does not depend
            on the bucket it is in.
        hierarchy: ``"flat"`` (default), ``"auto"`` or ``"node"``: quantize only between nodes,
            after a full-precision reduce-scatter inside each node (see :mod:`pycomm.hooks.hierarchy`).

    The state needs the model's parameter names (:meth:`bind`; ``pycomm.register`` does it): the
    residuals belong to parameters. A DDP bucket's plan holds them in flat working buffers while
    its layout lasts; when DDP rebuilds its buckets (after the first iteration, and at the first
    step after a resume) every parameter's residuals move to its new bucket, and the re-quantization
    residual of the elements a rank reduces moves with them (see ``QuantPlan.load``).

    Per-layer bit widths (for L-GreCo): :meth:`set_layer_params` maps a compressed layer, by
    parameter name, to its bits; layers without an entry use ``bits``. A DDP bucket whose layers
    differ is sent with a mixed bucket table (one kernel launch per phase, the same two
    collectives). ``observer``, when set, is called as ``observer(values, layers)`` once per
    bucket per compressed step, before compressing: ``values`` is a float32 tensor of the bucket's
    numel holding exactly what is quantized (buffer + worker residual; copy what you keep),
    ``layers`` the compressed layers as ``(name, offset, length, offset in the parameter)`` (in node
    mode a layer may be a piece of its parameter; in flat mode the last is 0). It is not pickled and not in
    :meth:`state_dict`.

    Residuals are per rank: checkpoint each rank's :meth:`state_dict` (e.g. to
    ``f"quant_rank{rank}.pt"``, or all of them with :func:`pycomm.checkpoint.gather_state_dicts`)
    and load it on the same rank.

    Example::

        import torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from pycomm.hooks import QuantState, quantized_allreduce_hook

        dist.init_process_group("gloo")          # run under torchrun
        model = DDP(torch.nn.Linear(1024, 1024))
        state = QuantState(bits=4).bind(model)
        model.register_comm_hook(state, quantized_allreduce_hook)
        model(torch.randn(8, 1024)).sum().backward()
    """

    _METHOD = "quant"

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, bits: int = 4, bucket_size: int = 512,
                 stochastic: bool = True, error_feedback: bool = True, start_iter: int = 2, min_numel: int = 1024,
                 seed: int = 0, hierarchy: str = "flat") -> None:
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
        self.hierarchy = _hierarchy.validated_hierarchy(hierarchy)
        self.iter = 0
        self.observer: Optional[_Observer] = None
        self._layer_params: dict[str, int] = {}
        self._params_version = 0
        self._plans: dict[int, QuantPlan] = {}
        self._store = ParamStore()
        self._loaded_padding: list[dict[str, Any]] = []

    # -- per-layer bit widths ------------------------------------------------
    @property
    def layer_params(self) -> dict[str, int]:
        """The per-layer bits overrides, ``{parameter name: bits}`` (a copy)."""
        return dict(self._layer_params)

    def set_layer_params(self, params: Optional[Mapping[str, int]]) -> None:
        """Set per-layer bits: ``{parameter name: bits}`` with bits in 1..8; None clears.

        Layers without an entry use ``bits``; entries of layers that are not compressed (``dim <= 1``
        or fewer than ``min_numel`` elements) have no effect. Takes effect the next time the hook
        sees each bucket; the residuals carry over. Every rank must set the same mapping at the
        same step: the next hook call checks that they did (one tiny collective, see
        :mod:`pycomm.hooks.agreement`) and raises ``RankDisagreementError`` on every rank if not.

        Raises:
            ValueError: a key that is not a name of the bound model, or bits outside 1..8.
        """
        self._layer_params = validated_layer_params(params, "bits", _validated_bits, self._names)
        self._params_version += 1
        agreement.settings_changed(self)

    def _check_bound(self) -> None:
        self._layer_params = validated_layer_params(self._layer_params, "bits", _validated_bits, self._names)
        super()._check_bound()

    def _fields(self) -> dict[str, bool]:
        return {"worker": self.error_feedback, "server": self.error_feedback}

    def _shard_alignment(self) -> int:
        # A piece of a layer then quantizes in the buckets, and draws at the places, of flat mode.
        return self.bucket_size

    # -- persistence -------------------------------------------------------
    _CONFIG = ("bits", "bucket_size", "stochastic", "error_feedback", "start_iter", "min_numel", "seed")

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the configuration, the step, the per-layer bits and each parameter's
        residuals by name (``params[name]["worker"]`` and ``["server"]``, shaped like the parameter)."""
        padding = [{"names": [name for name, _, _, _ in plan.layers], "layer_bits": list(plan.layer_bits),
                    "pieces": [[start, n] for _, _, n, start in plan.layers],
                    "world_size": plan.world, "residual": plan.padding_residual().clone()}
                   for plan in self._plans.values() if plan.server_residual is not None]
        return {**self._header(), "layer_params": dict(self._layer_params), "params": self._params_state(),
                "padding": padding or list(self._loaded_padding)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` before the first step; the first hook call puts each
        parameter's residuals into whatever bucket holds it then.

        Args:
            state_dict: a ``QuantState.state_dict()`` (of this rank).
            strict: raise :class:`~pycomm.hooks.param_state.CheckpointMismatch` (a ``ValueError``)
                at the first thing that does not fit: another method or setting (e.g. bits), a name
                the bound model does not have, or another shape. ``False`` loads what fits and logs
                the rest.
        """
        skipped: list[str] = []
        self._read_header(state_dict, strict, skipped)
        layer_params = state_dict.get("layer_params") or {}
        if self._names is not None and not strict:
            layer_params = {k: v for k, v in layer_params.items() if k in self._names.params}
        self._layer_params = validated_layer_params(layer_params, "bits", _validated_bits, self._names)
        self._params_version += 1
        self._load_params(state_dict, strict, skipped)
        self._loaded_padding = [entry for entry in state_dict.get("padding", []) if self.error_feedback]
        log_skipped(self._METHOD, skipped)
        agreement.settings_changed(self)

    # -- planning ------------------------------------------------------------
    def _plan(self, bucket: dist.GradBucket) -> QuantPlan:
        index = bucket.index()
        plan = self._plans.get(index)
        signature = plan_signature(bucket)
        if plan is not None and plan.signature == signature and plan.params_version == self._params_version:
            return plan
        pieces = bucket_pieces(bucket)
        names = self._require_names().names_of(p for p, _, _, _ in pieces)
        layers, dense = split_pieces(pieces, names, self.min_numel)
        layer_bits = tuple(self._layer_params.get(name, self.bits) for name, _, _, _ in layers)
        if plan is not None and plan.signature == signature and plan.layer_bits == layer_bits:
            plan.params_version = self._params_version
            return plan
        buffer = bucket.buffer()
        where = piece_slices(names, pieces)
        compressed = [name for name, _, _, _ in layers]
        plan = build_quant_plan(signature, names, layers, dense, numel=buffer.numel(), device=buffer.device,
                                bucket_size=self.bucket_size, world=dist.get_world_size(self.process_group),
                                rank=dist.get_rank(self.process_group), layer_bits=layer_bits,
                                error_feedback=self.error_feedback,
                                stream_names=self._require_names() if self.stochastic else None,
                                where={name: where[name] for name in compressed},
                                params_version=self._params_version)
        plan.load(self._store.take(compressed))
        self._store.claim(compressed if plan.worker_residual is not None else [], plan)
        self._restore_padding(plan)
        self._plans[index] = plan
        return plan

    def _restore_padding(self, plan: QuantPlan) -> None:
        """Give a plan the padding residual saved for the same layout (names, bits and world size);
        under another layout it is dropped: it holds no gradient, only the re-quantization error of
        padding."""
        if plan.server_residual is None:
            return
        names = [name for name, _, _, _ in plan.layers]
        pieces = [[start, n] for _, _, n, start in plan.layers]
        for entry in self._loaded_padding:
            if (entry.get("names") == names and list(entry.get("layer_bits", [])) == list(plan.layer_bits)
                    and entry.get("world_size") == plan.world and entry.get("pieces", pieces) == pieces):
                padding = plan.owned_positions() < 0
                values = entry["residual"]
                if isinstance(values, torch.Tensor) and values.numel() == int(padding.sum()):
                    plan.server_residual[padding] = values.to(plan.server_residual)
                self._loaded_padding.remove(entry)
                return


def build_quant_plan(signature: tuple, names: list[str], layers: list[Layer], dense: list[Dense], *, numel: int,
                     device: torch.device, bucket_size: int, world: int, rank: int, layer_bits: tuple[int, ...],
                     error_feedback: bool, stream_names: Optional[ParameterNames] = None,
                     where: Optional[dict[str, tuple[int, int, int, int]]] = None,
                     params_version: int = 0) -> QuantPlan:
    """The plan of a flat buffer of ``numel`` elements on ``device`` that
    :func:`pycomm.distributed.quantized_all_reduce` averages over ``world`` ranks (this one ``rank``).

    Args:
        signature: what identifies the buffer's layout (the plan is rebuilt when it changes).
        names: the names of the buffer's parameters, in buffer order.
        layers: the compressed pieces ``(name, offset in the buffer, length, offset in the parameter)``.
        dense: the pieces sent uncompressed ``(offset, length)``.
        layer_bits: bits of each compressed piece; one width gives the 2-column bucket table, several
            the mixed one (with a CPU copy that sizes payloads without waiting for the device).
        error_feedback: allocate the worker residual (``numel`` float32) and the server residual
            (this rank's chunk of buckets).
        stream_names: with stochastic rounding, the model's parameter names: each table row then draws
            at a Philox index fixed by its parameter and its offset there (see ``_row_streams``).
        where: each compressed parameter's piece ``(offset, length, offset in the parameter, numel)``,
            for :meth:`QuantPlan.export` and :meth:`QuantPlan.load`.
        params_version: the per-layer settings' version the plan was built for (L-GreCo).
    """
    table, host_table, worker, server, bits = None, None, None, None, (layer_bits[0] if layer_bits else 0)
    if layers:
        segments = [(o, n) for _, o, n, _ in layers]
        if len(set(layer_bits)) == 1:  # one width for the whole buffer: the 2-column table, as without overrides
            table = ops.bucket_table(segments, bucket_size, pad_to_multiple=world, device=device)
        else:
            bits = 0
            host_table = ops.bucket_table(segments, bucket_size, pad_to_multiple=world, bits=layer_bits)
            table = host_table.to(device)
            if table.device.type != "cuda":
                host_table = table
        if error_feedback:
            _, per_chunk = chunk_layout(numel, bucket_size, world, table)
            worker = torch.zeros(numel, dtype=torch.float32, device=device)
            server = torch.zeros(per_chunk * bucket_size, dtype=torch.float32, device=device)
    row_streams = None
    if layers and stream_names is not None:
        rows = host_table if host_table is not None else ops.bucket_table(segments, bucket_size, pad_to_multiple=world)
        row_streams = _row_streams(rows, layers, stream_names).to(device)
    return QuantPlan(signature, names, layers, dense, table=table, worker_residual=worker, row_streams=row_streams,
                     server_residual=server, layer_bits=layer_bits, bits=bits, host_table=host_table,
                     params_version=params_version, world=world, rank=rank, bucket_size=bucket_size,
                     where=dict(where or {}))


def quantized_allreduce_hook(state: QuantState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP bucket across ranks, quantized (see :class:`QuantState`).

    Register with ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``
    or in one line with ``pycomm.register(ddp_model, "quant", bits=4)``.
    Layers with ``dim <= 1`` or fewer than ``min_numel`` elements, and every layer
    before ``start_iter``, are all-reduced uncompressed.
    """
    state._require_names()
    agreement.check_settings(state, bucket, "quant")
    if (routed := _hierarchy.route(state, bucket, quantized_allreduce_hook)) is not None:  # node mode
        return routed
    group = state.process_group
    buffer = bucket.buffer()
    step = advance_step(state, bucket)
    if buffer.numel() == 0:  # node mode: an empty shard, empty on every rank of the inter-node group
        return completed_future(buffer)
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
        state.observer(values, list(plan.layers))
    small = take_dense(buffer, plan.dense)
    fut = quantized_all_reduce(
        buffer, bits=plan.bits if plan.bits else state.bits, bucket_size=state.bucket_size, op=dist.ReduceOp.AVG,
        group=group, async_op=True, stochastic=state.stochastic, seed=mix_seed(state.seed, step),
        worker_residual=plan.worker_residual, server_residual=plan.server_residual, bucket_table=plan.table,
        host_bucket_table=plan.host_table, row_streams=plan.row_streams)
    if small is None:
        return fut
    # The small layers travel uncompressed, after the quantized part, and are copied back here,
    # on the caller's stream (see allreduce_dense); the future stays the collective's own.
    # The decode writes only the table's elements, never these, so the two cannot race. On CPU,
    # where an overflow makes quantized_all_reduce reduce the whole buffer uncompressed before it
    # returns, these values are written after it and win, as the same average.
    allreduce_dense(buffer, plan.dense, small, group, world)
    return fut

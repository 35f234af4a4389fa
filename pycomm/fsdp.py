"""Compressed reduce-scatter for FSDP2 (``torch.distributed.fsdp.fully_shard``).

What FSDP2 (torch 2.13) asks of a custom reduce-scatter, read from
``torch/distributed/fsdp/_fully_shard/`` (``_fsdp_api.py``, ``_fsdp_collectives.py``,
``_fully_shard.py``, ``_fsdp_param_group.py``):

* ``FSDPModule.set_custom_reduce_scatter(comm: ReduceScatter) -> None`` stores ``comm`` on the
  module's param group (ValueError with several param groups, i.e. a per-parameter mesh from
  ``shard_placement_fn``). ``ReduceScatter`` is an ABC (``_fsdp_api.Comm``) with two abstract methods:

  - ``allocate(self, size: Sequence[int | SymInt], *, dtype: torch.dtype, device: torch.device)
    -> torch.Tensor``: FSDP allocates both the reduce-scatter input and the output through it.
  - ``__call__(self, output_tensor: Tensor, input_tensor: Tensor, group: ProcessGroup,
    op: _ReduceOp, async_op: bool = False) -> Work | None``. ``foreach_reduce`` calls it by keyword
    (``output_tensor=, input_tensor=, group=, op=``), never with ``async_op``, ignores what it
    returns, and only when the shard group has more than one rank.

* Layout: ``input_tensor`` is 1-D, ``W * S`` elements, all of one module's (param group's)
  gradients, written by ``torch.ops.fsdp.chunk_cat`` as a ``[W, S]`` view: row ``r`` is the
  concatenation of rank ``r``'s (dim-0 padded) shards of every gradient. ``output_tensor`` is 1-D
  with ``S`` elements: this rank's shard, the reduction of row ``rank`` over all ranks.
  FSDP frees the unsharded gradients after the copy-in, so the input may be modified.

* dtype: both tensors have the reduce dtype: ``MixedPrecisionPolicy.reduce_dtype`` or else the
  gradients' dtype. FSDP casts the output back to the parameters' dtype afterwards.

* ``op`` and divide factors (``_get_gradient_divide_factors``), with ``N`` the data-parallel size
  (shard group size, times the replicate size under HSDP) and ``f`` from
  ``set_gradient_divide_factor(f)``:

  - reduce dtype float32 or bfloat16: without ``f``, ``ReduceOp.AVG`` (``ReduceOp.SUM`` when
    ``N == 1``); with ``f`` equal to the shard group's size, ``ReduceOp.AVG``; with another ``f``,
    ``ReduceOp.PREMUL_SUM(1 / f)``, a ``ReduceOp`` instance whose ``.op`` is
    ``RedOpType.PREMUL_SUM`` and ``.factor`` is ``1 / f`` (Gloo itself rejects PREMUL_SUM).
  - any other reduce dtype (float16), or ``set_force_sum_reduction_for_comms(True)``:
    ``ReduceOp.SUM``; FSDP divides the input by a pre-factor and the output by a post-factor
    itself, outside the comm (for float16 a pre-factor near ``sqrt(f)``).

:class:`QuantizedReduceScatter` implements that interface: the ``W - 1`` chunks of the input that
peers own are quantized (``bits`` bits, stochastic rounding, per-bucket max-min, buckets that never
straddle a chunk boundary), exchanged with one ``all_to_all_single``, and the owner adds the
``W - 1`` decoded chunks to its own full-precision chunk (one fused pass), then scales by the op.
Each rank sends ``(W - 1) * (ceil(S / bucket_size) * record_bytes(bits, bucket_size) + 1)`` bytes
instead of the uncompressed ``(W - 1) * S * itemsize``; the extra byte per peer is an in-band flag.

Non-finite values: every rank appends to each peer's chunk one byte that says whether its own input
held a NaN or Inf (read from the quantized buckets' headers and its own chunk). After the exchange
every rank holds every rank's flag, so all agree. On CPU a flagged call is then reduce-scattered
again uncompressed (exactly as FSDP would have), so the overflow reaches the optimizer's check. On
CUDA, where that decision would wait for the device, the whole shard of every rank is set to NaN
instead (not yet run on a GPU).

Worker error feedback (``error_feedback=True``) keeps a float32 residual of every input element this
rank sends to a peer and adds it before quantizing, so the quantization error is sent on the next step
instead of lost. It costs as much memory as the module's unsharded (padded) gradient on every rank.
With feedback every parameter that requires a gradient must reach the reduce-scatter every step
(FSDP leaves a parameter without a gradient out of the input, which would shift the others): call
``model.set_reduce_scatter_unused_params(True)`` if some parameters can go unused; a call whose
input does not match raises a ValueError.

State (``FSDPCompressionState.state_dict()``, this rank's own, format 1): residuals are keyed by
fully-qualified parameter name (``model.named_parameters()``), like the DDP hooks' state::

    {"method": "quant", "format": 1, "world_size": W,
     "config": {"bits": .., "bucket_size": .., "stochastic": .., "seed": .., "error_feedback": ..},
     "calls": {module_name: int},                 # reduce-scatter calls; they seed the rounding
     "params": {param_name: {"residual": Tensor}}}  # only with error feedback

``params[name]["residual"]`` is float32 with shape ``[W, *padded_sharded_size]``: entry ``r`` is what
this rank has not yet sent of rank ``r``'s shard of that parameter's gradient (FSDP's dim-0-padded
shard, ``FSDPParam.padded_sharded_param_size``; rows past the parameter's end hold the error of the
padding, which FSDP discards), and entry ``rank`` is zero (a rank's own chunk is never quantized). The layout depends on the world size, so a
checkpoint resumes on the same world size (and the same ``fully_shard`` wrapping) only; loading
checks the method, format, world size, settings, module and parameter names and shapes, and raises a
ValueError that lists what differs. The state differs from rank to rank: with
``torch.distributed.checkpoint`` put it under a per-rank key, for example::

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp

    key = f"pycomm_rank{dist.get_rank()}"      # DCP keeps one copy of a key that all ranks share
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd, key: state.state_dict()}, checkpoint_id=path)

    # resume, in fresh processes after fully_shard and compress()/register() of the same model:
    msd, osd = get_state_dict(model, optimizer)
    saved = {"model": msd, "optim": osd, key: state.state_dict()}  # a template of the right shapes
    dcp.load(saved, checkpoint_id=path)                            # loads in place
    set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    state.load_state_dict(saved[key])

HSDP (FSDP inside a node, compressed all-reduce across replicas) is :mod:`pycomm.hsdp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from pycomm import ops
from pycomm.distributed import mix_seed
from pycomm.hooks.param_state import (check_header, check_layout, check_module_calls, log_skipped,
                                      param_tensors_for_load, report_mismatch)
from pycomm.ops.quantization import dequantize_sum_records, quantize_records
from pycomm.ops.validation import check_bits_bucket

__all__ = ["QuantizedReduceScatter", "FSDPCompressionState", "compress", "reduce_scale", "contains_fsdp",
           "STATE_FORMAT"]

_FLAG_BYTES = 1

#: Version of :meth:`FSDPCompressionState.state_dict`'s layout (``state_dict()["format"]``).
STATE_FORMAT = 1


def reduce_scale(op: Union[dist.ReduceOp, "dist.ReduceOp.RedOpType"], world: int) -> float:
    """The factor a sum is multiplied by for ``op``: SUM 1, AVG ``1 / world``, PREMUL_SUM its factor."""
    kind = getattr(op, "op", op)  # a ReduceOp instance (PREMUL_SUM) carries its RedOpType in .op
    if kind == dist.ReduceOp.SUM:
        return 1.0
    if kind == dist.ReduceOp.AVG:
        return 1.0 / world
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = op.factor
        return float(factor.item() if isinstance(factor, torch.Tensor) else factor)
    raise ValueError(f"op must be ReduceOp.SUM, AVG or PREMUL_SUM (what FSDP2 passes), got {op}")


class QuantizedReduceScatter(ReduceScatter):
    """FSDP2 ``ReduceScatter`` that sends the peers' chunks quantized to ``bits`` bits.

    Args:
        bits: 1..8 bits per element.
        bucket_size: elements per quantization bucket (a multiple of 8).
        stochastic: unbiased stochastic rounding (else round to nearest).
        seed: seed of the stochastic rounding; mixed with the call count and the rank.
        name: a label (the module's name in the model), for messages and state.
        error_feedback: keep a float32 residual of the input (``W * S`` elements, zero on this rank's own
            chunk) and add it before quantizing, so the quantization error is sent on the next step
            instead of lost. It costs ``4 * W * S`` bytes per module per rank: the size of the module's
            unsharded gradient, which FSDP otherwise never keeps. Reset to zero after a non-finite call.
        params: the module's parameters in the order FSDP lays them out in the input, as
            ``(fully-qualified name, padded shard shape)`` pairs (what :func:`compress` passes). The
            state's residuals are keyed by these names. None (a comm used on its own): one residual
            named ``""`` over the whole ``[W, S]`` input.
    """

    def __init__(self, bits: int = 4, bucket_size: int = 512, stochastic: bool = True, seed: int = 0,
                 name: str = "", error_feedback: bool = False,
                 params: Optional[Sequence[tuple[str, Sequence[int]]]] = None) -> None:
        check_bits_bucket(bits, bucket_size)
        self.params: Optional[list[tuple[str, tuple[int, ...]]]] = (
            None if params is None else [(n, tuple(int(d) for d in shape)) for n, shape in params])
        self.world_size: Optional[int] = None  # the shard group's size, known at the first call
        self.bits = bits
        self.bucket_size = bucket_size
        self.stochastic = stochastic
        self.seed = seed
        self.name = name
        self.calls = 0
        self.uncompressed_calls = 0
        self.error_feedback = error_feedback
        self.residual: Optional[torch.Tensor] = None
        self._tables: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def allocate(self, size: Sequence[Union[int, torch.SymInt]], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _table(self, shard_numel: int, world: int, device: torch.device) -> torch.Tensor:
        """Buckets per chunk: chunk ``r``'s rows are ``[r * nb, (r + 1) * nb)``, none straddles a chunk."""
        key = (shard_numel, world, device)
        if key not in self._tables:
            self._tables[key] = ops.bucket_table([(r * shard_numel, shard_numel) for r in range(world)],
                                                 self.bucket_size, device=device)
        return self._tables[key]

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Union[dist.ReduceOp, "dist.ReduceOp.RedOpType"], async_op: bool = False):
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        shard = output_tensor.numel()
        if input_tensor.numel() != world * shard or not input_tensor.is_contiguous() \
                or not output_tensor.is_contiguous():
            raise ValueError(f"reduce-scatter{' of ' + self.name if self.name else ''}: input must be contiguous "
                             f"with world size * output numel elements ({world} * {shard}), got "
                             f"{input_tensor.numel()}")
        scale = reduce_scale(op, world)
        self.world_size = world
        self.calls += 1
        flat = input_tensor.view(-1)
        if world > 1 and shard > 0:
            self._reduce_scatter(output_tensor.view(-1), flat, group, world, rank, scale)
        else:
            output_tensor.view(-1).copy_(flat[rank * shard:(rank + 1) * shard] * scale)
        if async_op:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result([output_tensor])
            return torch._C._distributed_c10d._create_work_from_future(fut)
        return None

    def _reduce_scatter(self, out: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup, world: int,
                        rank: int, scale: float) -> None:
        shard = out.numel()
        table = self._table(shard, world, flat.device)
        per_chunk = table.shape[0] // world
        first = rank * per_chunk
        residual = self._residual_for(flat, world) if self.error_feedback else None
        send = quantize_records(flat, bits=self.bits, bucket_size=self.bucket_size, stochastic=self.stochastic,
                                seed=mix_seed(self.seed, self.calls, rank, 1), residual=residual, bucket_table=table,
                                num_buckets=table.shape[0], skip_begin=first, skip_end=first + per_chunk)
        own = flat[rank * shard:(rank + 1) * shard]
        # The peers' buckets are non-finite iff their headers are (our own chunk's are zero records).
        bad = ~torch.isfinite(send[:, :ops.HEADER_BYTES].contiguous().view(torch.float32)).all() \
            | ~torch.isfinite(own).all()
        record = send.shape[1]
        framed = torch.empty((world, per_chunk * record + _FLAG_BYTES), dtype=torch.uint8, device=flat.device)
        framed[:, :-_FLAG_BYTES].copy_(send.view(world, per_chunk * record))
        framed[:, -1] = bad.to(torch.uint8)
        received = torch.empty_like(framed)
        dist.all_to_all_single(received, framed, group=group)
        any_bad = received[:, -1].any()
        if not flat.is_cuda and bool(any_bad):
            # Every rank holds every rank's flag, so every rank takes this branch together.
            self.uncompressed_calls += 1
            if residual is not None:  # it took in the non-finite values; the step is lost anyway
                residual.zero_()
            dist.reduce_scatter_single(out, flat, group=group, op=dist.ReduceOp.SUM)
            out.mul_(scale)
            return
        payloads = received[:, :-_FLAG_BYTES].contiguous().view(world, per_chunk, record)
        reduced = dequantize_sum_records(payloads, bits=self.bits, bucket_size=self.bucket_size, init=flat,
                                         bucket_table=table, init_bucket_begin=first)[:shard]
        if scale != 1.0:
            reduced.mul_(scale)
        if flat.is_cuda:  # no host sync: poison every shard when any rank overflowed
            reduced = torch.where(any_bad, torch.full_like(reduced, math.nan), reduced)
        out.copy_(reduced)

    def _residual_for(self, flat: torch.Tensor, world: int) -> torch.Tensor:
        if self.params is not None:
            expected = sum(math.prod(shape) for _, shape in self.params)
            if flat.numel() != world * expected:
                raise ValueError(
                    f"reduce-scatter of {self.name or 'the root module'}: the input has {flat.numel()} elements, "
                    f"not {world} * {expected} (the padded shards of {[n for n, _ in self.params]}); "
                    "with error feedback every parameter that requires a gradient must get one each step "
                    "(call model.set_reduce_scatter_unused_params(True) if some can go unused), and "
                    "requires_grad must not change after compress()")
        if self.residual is None:
            self.residual = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        elif self.residual.numel() != flat.numel():
            raise ValueError(f"reduce-scatter{' of ' + self.name if self.name else ''}: the input has "
                             f"{flat.numel()} elements but the error-feedback residual {self.residual.numel()}; "
                             f"one comm serves one FSDP module (same world size as when it was saved, and every "
                             f"parameter that requires a gradient gets one each step)")
        elif self.residual.device != flat.device:  # loaded from a checkpoint on another device
            self.residual = self.residual.to(flat.device)
        return self.residual

    def residuals(self) -> dict[str, torch.Tensor]:
        """Each parameter's residual as a ``[W, *padded shard shape]`` copy (see the module docstring).

        Empty without error feedback. Before the first call: zeros (so that the state is a template
        for ``torch.distributed.checkpoint.load``), or nothing for a comm without a parameter layout.
        """
        if not self.error_feedback or self.world_size is None:
            return {}
        world = self.world_size
        if self.residual is None:
            return {} if self.params is None else {name: torch.zeros((world, *shape)) for name, shape in self.params}
        rows = self.residual.view(world, -1)
        layout = [("", (rows.shape[1],))] if self.params is None else self.params
        out, offset = {}, 0
        for name, shape in layout:
            numel = math.prod(shape)
            out[name] = rows[:, offset:offset + numel].reshape(world, *shape).clone()
            offset += numel
        return out

    def load_residuals(self, residuals: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`residuals` (ValueError that names what differs: names, shapes, world size)."""
        if not self.error_feedback:
            if residuals:
                raise ValueError(f"the checkpoint has error-feedback residuals for {sorted(residuals)} but this "
                                 f"comm{' of ' + self.name if self.name else ''} runs without error feedback")
            return
        if self.params is None:
            if set(residuals) != {""}:
                raise ValueError(f"a comm without a parameter layout keeps one residual named '', the checkpoint "
                                 f"has {sorted(residuals)}")
            saved = residuals[""]
            if saved.dim() != 2 or (self.world_size is not None and saved.shape[0] != self.world_size):
                raise ValueError(f"the residual must be [world size ({self.world_size}), shard numel], got "
                                 f"{tuple(saved.shape)}")
            self.world_size = saved.shape[0]
            self.residual = saved.detach().to(torch.float32).reshape(-1).clone()
            return
        expected = {name: shape for name, shape in self.params}
        missing, unexpected = sorted(set(expected) - set(residuals)), sorted(set(residuals) - set(expected))
        if missing or unexpected:
            raise ValueError(f"residuals of module {self.name!r}: the checkpoint lacks {missing} and has "
                             f"parameters the module does not have {unexpected}")
        world = self.world_size if self.world_size is not None else \
            next(iter(residuals.values())).shape[0] if residuals else 1
        wrong = [f"{name}: checkpoint {tuple(residuals[name].shape)}, model {(world, *shape)}"
                 for name, shape in self.params if tuple(residuals[name].shape) != (world, *shape)]
        if wrong:
            raise ValueError(f"residuals of module {self.name!r} have other shapes ([world size, *padded shard "
                             f"shape]): {'; '.join(wrong)}")
        if not self.params:
            self.residual = None
            return
        device = self.residual.device if self.residual is not None else residuals[self.params[0][0]].device
        self.residual = torch.cat([residuals[name].detach().to(device, torch.float32).reshape(world, -1)
                                   for name, _ in self.params], dim=1).reshape(-1)

    def state_dict(self) -> dict[str, object]:
        """The call count (it seeds the rounding) and the residuals by parameter name (:meth:`residuals`)."""
        return {"calls": self.calls, "residuals": self.residuals()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the same module layout and world size)."""
        self.load_residuals(state["residuals"])
        self.calls = int(state["calls"])


@dataclass
class FSDPCompressionState:
    """What :func:`compress` installed: one comm per FSDP module, by the module's name.

    ``state_dict()`` keys the error-feedback residuals by parameter name (format in the module docstring).
    """

    comms: dict[str, QuantizedReduceScatter] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1

    @property
    def uncompressed_calls(self) -> int:
        """Reduce-scatters that fell back to uncompressed because of a NaN or Inf on some rank."""
        return sum(c.uncompressed_calls for c in self.comms.values())

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: settings, each module's call count, each parameter's residual by name."""
        params: dict[str, dict[str, torch.Tensor]] = {}
        for comm in self.comms.values():
            params.update({name: {"residual": r} for name, r in comm.residuals().items()})
        return {"method": "quant", "format": STATE_FORMAT, "world_size": self.world_size, "config": dict(self.config),
                "calls": {name: comm.calls for name, comm in self.comms.items()}, "params": dict(sorted(params.items()))}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` into a model sharded and compressed the same way.

        Args:
            state: this rank's :meth:`state_dict` (``pycomm.checkpoint.load_rank_state_dict`` picks it
                from every rank's list).
            strict: raise on a setting, module or parameter that does not fit; ``False`` keeps this
                state's settings, loads the residuals that fit (the others start from zero) and logs
                what it skipped.

        Raises:
            CheckpointMismatch (a ValueError): not this method or format, or another world size (the
                residuals' layout depends on it, even with ``strict=False``); with ``strict``, another
                setting, other modules, missing or unknown parameter names, or another shape. The message
                lists what differs.
        """
        skipped: list[str] = []
        check_header(state, "quant", self.config, strict, skipped, state_format=STATE_FORMAT)
        check_layout(state, {"world_size": self.world_size})
        calls = check_module_calls(state.get("calls"), self.comms, strict, skipped)
        error_feedback = bool(self.config.get("error_feedback"))
        shapes = {n: (self.world_size, *shape) for comm in self.comms.values() if error_feedback
                  for n, shape in comm.params or []}
        saved = state.get("params", {})
        if isinstance(saved, Mapping):
            missing, unexpected = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
            if missing or unexpected:
                report_mismatch(strict, f"the checkpoint lacks residuals of the parameters {missing} and has "
                                        f"residuals of parameters the model does not have {unexpected}", skipped)
                saved = {n: v for n, v in saved.items() if n in shapes}
        kept = param_tensors_for_load(saved, shapes, {"residual": error_feedback}, strict, skipped)
        for name, comm in self.comms.items():
            if error_feedback and comm.params is not None:
                comm.load_residuals({n: kept[n]["residual"] if n in kept else torch.zeros(shapes[n])
                                     for n, _ in comm.params})
            if name in calls:
                comm.calls = calls[name]
        log_skipped("FSDP", skipped)


def contains_fsdp(model: Any) -> bool:
    """Whether ``model`` is or contains a ``fully_shard`` module (an ``FSDPModule``)."""
    return isinstance(model, torch.nn.Module) and any(isinstance(m, FSDPModule) for m in model.modules())


def _param_layout(model: torch.nn.Module, module: FSDPModule) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """The module's parameters as FSDP lays them out in its reduce-scatter input, and its shard group's size."""
    group = module._get_fsdp_state()._fsdp_param_group
    if group is None:  # no parameters of its own
        return [], 1
    names = {id(p): n for n, p in model.named_parameters()}
    layout = [(names[id(fp.sharded_param)], tuple(fp.padded_sharded_param_size))
              for fp in group.fsdp_params if fp.sharded_param.requires_grad]
    return layout, group.mesh_info.shard_mesh_size


def compress(model: torch.nn.Module, method: str = "quant", bits: int = 4, bucket_size: int = 512,
             stochastic: bool = True, seed: int = 0, error_feedback: bool = False) -> FSDPCompressionState:
    """Install a :class:`QuantizedReduceScatter` on every ``FSDPModule`` of ``model`` (``fully_shard`` first).

    Returns the state that holds the comms, keyed by module name ("" for the root); its
    ``state_dict`` keys the residuals by ``model.named_parameters()`` names.
    """
    if method != "quant":
        raise ValueError(f"method must be 'quant' under FSDP2, got {method!r}: DGC's momentum correction needs a "
                         "full-size accumulator on every rank, which undoes FSDP's memory savings")
    check_bits_bucket(bits, bucket_size)
    state = FSDPCompressionState(config={"bits": bits, "bucket_size": bucket_size, "stochastic": stochastic,
                                         "seed": seed, "error_feedback": error_feedback})
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            params, world = _param_layout(model, module)
            comm = QuantizedReduceScatter(bits, bucket_size, stochastic, mix_seed(seed, len(state.comms)), name,
                                          error_feedback, params=params)
            if params:
                comm.world_size = world
                state.world_size = world
            module.set_custom_reduce_scatter(comm)
            state.comms[name] = comm
    if not state.comms:
        raise ValueError("model has no FSDPModule: apply torch.distributed.fsdp.fully_shard before compress()")
    return state

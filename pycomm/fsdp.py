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

Worker error feedback (``error_feedback=True``) keeps one float32 residual per module over the whole
reduce-scatter input, so it costs as much memory as the module's unsharded gradient on every rank.
Its state is keyed by module name, with the residual in the input's ``[W, S]`` layout.

Not yet done (issue 16): residuals keyed by parameter name (the hooks' state format), HSDP's replica
all-reduce, checkpoint resume tests, and ``pycomm bench e2e --parallel fsdp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from pycomm import ops
from pycomm.distributed import mix_seed
from pycomm.ops.quantization import dequantize_sum_records, quantize_records
from pycomm.ops.validation import check_bits_bucket

__all__ = ["QuantizedReduceScatter", "FSDPCompressionState", "compress", "reduce_scale"]

_FLAG_BYTES = 1


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
    """

    def __init__(self, bits: int = 4, bucket_size: int = 512, stochastic: bool = True, seed: int = 0,
                 name: str = "", error_feedback: bool = False) -> None:
        check_bits_bucket(bits, bucket_size)
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
        residual = self._residual_for(flat) if self.error_feedback else None
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

    def _residual_for(self, flat: torch.Tensor) -> torch.Tensor:
        if self.residual is None:
            self.residual = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        elif self.residual.numel() != flat.numel():
            raise ValueError(f"reduce-scatter{' of ' + self.name if self.name else ''}: the input has "
                             f"{flat.numel()} elements but the error-feedback residual {self.residual.numel()}; "
                             f"one comm serves one FSDP module (same world size as when it was saved)")
        elif self.residual.device != flat.device:  # loaded from a checkpoint on another device
            self.residual = self.residual.to(flat.device)
        return self.residual

    def state_dict(self) -> dict[str, object]:
        """The call count (it seeds the rounding) and the residual (None before the first call)."""
        return {"calls": self.calls, "residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned (the same module layout and world size)."""
        self.calls = int(state["calls"])
        residual = state["residual"]
        self.residual = None if residual is None else torch.as_tensor(residual, dtype=torch.float32).clone()


@dataclass
class FSDPCompressionState:
    """What :func:`compress` installed: one comm per FSDP module, by the module's name."""

    comms: dict[str, QuantizedReduceScatter] = field(default_factory=dict)

    @property
    def uncompressed_calls(self) -> int:
        """Reduce-scatters that fell back to uncompressed because of a NaN or Inf on some rank."""
        return sum(c.uncompressed_calls for c in self.comms.values())

    def state_dict(self) -> dict[str, dict[str, object]]:
        """Each comm's :meth:`QuantizedReduceScatter.state_dict`, by module name (this rank's own)."""
        return {name: comm.state_dict() for name, comm in self.comms.items()}

    def load_state_dict(self, state: dict[str, dict[str, object]]) -> None:
        """Restore :meth:`state_dict` into a model compressed the same way (ValueError if modules differ)."""
        if set(state) != set(self.comms):
            raise ValueError(f"state has modules {sorted(state)} but the model has {sorted(self.comms)}")
        for name, comm in self.comms.items():
            comm.load_state_dict(state[name])


def compress(model: torch.nn.Module, method: str = "quant", bits: int = 4, bucket_size: int = 512,
             stochastic: bool = True, seed: int = 0, error_feedback: bool = False) -> FSDPCompressionState:
    """Install a :class:`QuantizedReduceScatter` on every ``FSDPModule`` of ``model`` (``fully_shard`` first).

    Returns the state that holds the comms, keyed by module name ("" for the root).
    """
    if method != "quant":
        raise ValueError(f"method must be 'quant' (the only FSDP method so far), got {method!r}")
    check_bits_bucket(bits, bucket_size)
    state = FSDPCompressionState()
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            comm = QuantizedReduceScatter(bits, bucket_size, stochastic, mix_seed(seed, len(state.comms)), name,
                                          error_feedback)
            module.set_custom_reduce_scatter(comm)
            state.comms[name] = comm
    if not state.comms:
        raise ValueError("model has no FSDPModule: apply torch.distributed.fsdp.fully_shard before compress()")
    return state

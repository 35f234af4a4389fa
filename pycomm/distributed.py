"""Compressed collectives built on ``torch.distributed`` (Gloo on CPU, NCCL on GPU).

:func:`quantized_all_reduce` is a scatter-reduce-allgather in quantized form:

1. the tensor is split into W chunks of whole buckets; each rank quantizes the
   W-1 chunks owned by its peers (one kernel launch) and sends them with one
   ``all_to_all_single``;
2. the owner of a chunk sums its own full-precision values with the W-1
   decoded contributions (one fused pass), then re-quantizes the sum once;
3. one ``all_gather_into_tensor`` spreads the reduced chunks and every rank,
   the owner included, decodes all of them, so every rank ends with the same
   bits.

Each value is quantized twice in all, whatever W is (a ring that re-quantizes
at every hop would compound W-1 errors). Each rank sends about
``2 (W-1)/W * payload`` bytes, the same volume as a ring all-reduce of the
payload: at 4 bits and buckets of 512 that is 7.8x less than fp32.

With a mixed (4-column) bucket table from :func:`pycomm.ops.bucket_table` with
``bits``, every bucket has its own bit width. The table's W chunks have equal
bytes (the table builder balances them), so the collectives are the same two
calls with equal splits; each rank sends exactly ``(W-1)/W`` of the table's
payload in the all-to-all and ``(W-1)/W`` of it in the all-gather.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from pycomm import ops
from pycomm.ops.quantization import dequantize_records_into, dequantize_sum_records, quantize_records
from pycomm.ops.validation import check_bits_bucket, check_float_tensor

__all__ = ["quantized_all_reduce", "mix_seed", "chunk_layout", "mixed_chunk_bytes"]

_MASK64 = (1 << 64) - 1


def mix_seed(*words: int) -> int:
    """Hash integers into a 64-bit seed (SplitMix64 finalizer), e.g. (seed, step, rank, phase)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    # torch's int64 schema argument is signed; the kernels use the same 64 bits.
    return h - (1 << 64) if h >= (1 << 63) else h


def chunk_layout(numel: int, bucket_size: int, world_size: int,
                 bucket_table: Optional[torch.Tensor] = None) -> tuple[int, int]:
    """Return (total buckets padded to a multiple of W, buckets per chunk)."""
    total = bucket_table.shape[0] if bucket_table is not None else ops.num_buckets(numel, bucket_size)
    padded = -(-total // world_size) * world_size
    if bucket_table is not None and padded != total:
        raise ValueError(f"bucket_table has {total} rows; pad it to a multiple of the world size ({world_size})")
    return padded, padded // world_size


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                           async_op: bool = False):
    """``dist.all_gather_single`` where torch has it (2.13+), else ``dist.all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


def completed_future(value: torch.Tensor) -> torch.futures.Future:
    """A future already holding ``value``: what an async collective (or a hook) returns when it has
    finished the work before returning. The hooks use it too (``pycomm.hooks.hook_state``)."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def _headers_nonfinite(payload: torch.Tensor, host_table: Optional[torch.Tensor] = None) -> bool:
    if host_table is None:
        header = payload[:, : ops.HEADER_BYTES].contiguous().view(torch.float32)
    else:  # a mixed table's flat payload: the header bytes of each record
        index = host_table[:, 3:4] + torch.arange(ops.HEADER_BYTES)
        header = payload[index.to(payload.device)].view(torch.float32)
    return not bool(torch.isfinite(header).all())


def mixed_chunk_bytes(host_table: torch.Tensor, bucket_size: int, world_size: int) -> int:
    """Bytes of each of the ``world_size`` chunks of a mixed bucket table (CPU copy).

    Raises ValueError unless the rows split into ``world_size`` runs of equal row counts that
    start at multiples of the same byte size, which :func:`pycomm.ops.bucket_table` with
    ``bits`` and ``pad_to_multiple=world_size`` guarantees. (The ops check the rest of the table.)
    """
    if host_table.device.type != "cpu" or host_table.dtype != torch.int64 or host_table.dim() != 2 \
            or host_table.shape[1] != 4:
        raise ValueError(f"the host copy of a mixed bucket_table must be an int64 CPU tensor [rows, 4], got "
                         f"{host_table.dtype} {tuple(host_table.shape)} on {host_table.device}")
    rows = host_table.shape[0]
    if rows % world_size:
        raise ValueError(f"bucket_table has {rows} rows; build it with pad_to_multiple={world_size} (the world size)")
    total = ops.mixed_payload_bytes(host_table, bucket_size)
    chunk = total // world_size
    if rows:
        starts = host_table[:: rows // world_size, 3]
        if total % world_size or not torch.equal(starts, torch.arange(world_size) * chunk):
            raise ValueError(f"the {world_size} chunks of the mixed bucket_table differ in bytes (chunk starts "
                             f"{starts.tolist()}, total {total}); build it with ops.bucket_table(..., bits=..., "
                             f"pad_to_multiple={world_size})")
    return chunk


def quantized_all_reduce(
    tensor: torch.Tensor,
    bits: int = 4,
    bucket_size: int = 512,
    op: dist.ReduceOp = dist.ReduceOp.SUM,
    group: Optional[dist.ProcessGroup] = None,
    async_op: bool = False,
    stochastic: bool = True,
    seed: int = 0,
    worker_residual: Optional[torch.Tensor] = None,
    server_residual: Optional[torch.Tensor] = None,
    bucket_table: Optional[torch.Tensor] = None,
    host_bucket_table: Optional[torch.Tensor] = None,
    row_streams: Optional[torch.Tensor] = None,
) -> Optional[torch.futures.Future]:
    """All-reduce ``tensor`` in place, sending it quantized to ``bits`` bits.

    The semantics are those of ``dist.all_reduce``: on return (or when the
    future completes) every rank holds the same reduced tensor, bit for bit.

    Args:
        tensor: contiguous float32/float16/bfloat16 tensor, the same shape on every rank.
        bits: 1..8 bits per element (ignored with a mixed bucket table, whose rows carry their bits).
        bucket_size: elements per quantization bucket (a multiple of 8).
        op: ``ReduceOp.SUM`` or ``ReduceOp.AVG``.
        group: the process group (default: the world).
        async_op: return a ``torch.futures.Future`` holding ``tensor`` instead of waiting.
            The all-to-all phase has completed when the call returns; the all-gather and the
            decode run asynchronously on CUDA. On CPU the whole collective completes before returning.
        stochastic: unbiased stochastic rounding (else round to nearest).
        seed: seed for stochastic rounding; mixed with the rank and phase, so pass e.g. ``mix_seed(seed, step)``.
        worker_residual: float32 tensor of ``tensor.numel()`` elements for error feedback of the
            first quantization (updated in place), or None.
        server_residual: float32 tensor of ``buckets_per_chunk * bucket_size`` elements for error
            feedback of the re-quantization of this rank's chunk (updated in place), or None.
        bucket_table: optional layout from :func:`pycomm.ops.bucket_table` (padded to a multiple of W);
            elements not covered by it are left untouched. A mixed table (built with ``bits=`` and
            ``pad_to_multiple=W``) quantizes each bucket with its own bits, in both phases.
        host_bucket_table: a CPU copy of a CUDA mixed ``bucket_table``; the ops read it to size
            the payloads. Without it the table is copied to the host, which waits for the stream.
            With a CPU ``bucket_table`` it must equal the table (else RuntimeError). With a CUDA
            table it is validated but not compared with the device copy (that would wait): keep
            them equal. A differing device table gives wrong values, but the kernels never read or
            write outside the tensors and the payloads are zero-filled, so no stale memory is sent.
        row_streams: optional int64 tensor on ``tensor``'s device with one entry per bucket (the
            table's rows, padded to a multiple of W): element j of bucket k draws its stochastic
            rounding from Philox index ``row_streams[k] + j`` in both phases (see
            :func:`pycomm.ops.quantization.quantize_records`), instead of from the bucket's position.
            The hooks pass (parameter, offset in the parameter), so that a layer's rounding does
            not depend on its neighbours. The re-quantization of a reduced chunk is then seeded
            without the rank (each element is re-quantized by one rank only), so its draws do not
            depend on which rank owns the chunk either.

    Volume per rank: the all-to-all sends ``(W-1)/W`` of the payload (``num_buckets`` records; of
    a mixed table, :func:`pycomm.ops.mixed_payload_bytes`) and the all-gather the same again.

    Non-finite values: on CPU, if any bucket held a NaN or Inf on any rank (every rank sees this in
    the gathered payload, so all agree), the tensor is all-reduced again uncompressed, so the
    overflow reaches AMP's GradScaler exactly. On CUDA, where that check would need a host-device
    synchronisation, the affected buckets decode as NaN, which GradScaler also detects.
    """
    if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        raise ValueError(f"op must be ReduceOp.SUM or ReduceOp.AVG, got {op}")
    check_float_tensor(tensor, "tensor")
    check_bits_bucket(bits, bucket_size)
    if not tensor.is_contiguous():
        raise ValueError("tensor must be contiguous (it is reduced in place)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    flat = tensor.view(-1)
    if world == 1 or flat.numel() == 0:
        return completed_future(tensor) if async_op else None
    if bucket_table is not None and bucket_table.device != tensor.device:
        raise ValueError(f"bucket_table is on {bucket_table.device} but tensor is on {tensor.device}")

    total, per_chunk = chunk_layout(flat.numel(), bucket_size, world, bucket_table)
    if worker_residual is not None and (worker_residual.dtype != torch.float32 or worker_residual.numel() != flat.numel()):
        raise ValueError(f"worker_residual must be float32 with {flat.numel()} elements")
    if server_residual is not None and (server_residual.dtype != torch.float32
                                        or server_residual.numel() != per_chunk * bucket_size):
        raise ValueError(f"server_residual must be float32 with {per_chunk * bucket_size} elements")
    first = rank * per_chunk

    mixed = bucket_table is not None and bucket_table.dim() == 2 and bucket_table.shape[1] == 4
    host = None
    if mixed:
        if host_bucket_table is not None:
            host = host_bucket_table
        else:
            host = bucket_table if bucket_table.device.type == "cpu" else bucket_table.cpu()  # waits (documented)
        mixed_chunk_bytes(host, bucket_size, world)
        # Each row carries its bits (the ops take bits=0); chunk byte sizes are equal, so the
        # collectives below take the flat payloads with equal splits.
        bits = 0

    # Phase 1: quantize the peers' chunks (ours is written as zero records and
    # kept in full precision), exchange, and reduce our chunk.
    if row_streams is not None and (row_streams.dim() != 1 or row_streams.numel() != total):
        raise ValueError(f"row_streams must be 1-D with one entry per bucket ({total}), got shape "
                         f"{tuple(row_streams.shape)}")
    send = quantize_records(flat, bits=bits, bucket_size=bucket_size, stochastic=stochastic,
                             seed=mix_seed(seed, rank, 1), residual=worker_residual, bucket_table=bucket_table,
                             num_buckets=total, skip_begin=first, skip_end=first + per_chunk, host_table=host,
                             row_streams=row_streams)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    reduced = dequantize_sum_records(recv.view(world, per_chunk, -1) if not mixed else recv.view(world, -1),
                                      bits=bits, bucket_size=bucket_size, init=flat, bucket_table=bucket_table,
                                      init_bucket_begin=first, host_table=host)
    if op == dist.ReduceOp.AVG:
        reduced.div_(world)

    # Phase 2: re-quantize the reduced chunk once and gather every chunk.
    own_streams = None if row_streams is None else row_streams[first:first + per_chunk]
    seed2 = mix_seed(seed, rank, 2) if row_streams is None else mix_seed(seed, 2)
    if mixed:
        own = quantize_records(reduced, bits=0, bucket_size=bucket_size, stochastic=stochastic, seed=seed2,
                                residual=server_residual, bucket_table=bucket_table, num_buckets=per_chunk,
                                host_table=host, chunk_row_begin=first, row_streams=own_streams)
    else:
        own = quantize_records(reduced, bits=bits, bucket_size=bucket_size, stochastic=stochastic, seed=seed2,
                                residual=server_residual, num_buckets=per_chunk, row_streams=own_streams)
    gathered = torch.empty_like(send)

    def decode(_: object = None) -> torch.Tensor:
        dequantize_records_into(gathered, flat, bits=bits, bucket_size=bucket_size, bucket_table=bucket_table,
                                 host_table=host)
        return tensor

    if tensor.is_cuda:
        work = all_gather_into_tensor(gathered, own, group=group, async_op=True)
        fut = work.get_future().then(decode)
        if async_op:
            return fut
        fut.wait()
        return None

    all_gather_into_tensor(gathered, own, group=group)
    if _headers_nonfinite(gathered, host):
        # Every rank sees the same gathered bytes, so every rank takes this branch.
        dist.all_reduce(flat, group=group)
        if op == dist.ReduceOp.AVG:
            flat.div_(world)
    else:
        decode()
    return completed_future(tensor) if async_op else None

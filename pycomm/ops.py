"""Thin, documented wrappers over the ``torch.ops.pycomm`` kernels.

The quantized byte format (bucket records of ``[min f32][unit f32][levels]``)
is specified in ``csrc/include/pycomm/quant_format.h``. CPU and CUDA produce
the same bytes for the same input and seed.

Ops that write into their arguments (quantize's ``residual``, dequantize's ``out``,
``dgc_compensate``'s ``u`` and ``v``, ``dgc_mask``, ``first_bad``, ``philox_axpy_`` and
``philox_axpy_multi_``) follow torch's rule for in-place ops, also when called as raw
``torch.ops.pycomm.*``: with grad mode on, a leaf that requires grad raises ``ValueError``
(they have no derivative: call them under ``torch.no_grad()``), and every tensor they write
gets its version counter bumped, so a backward that saved it raises instead of silently
using the new values.

Example::

    import torch, pycomm
    x = torch.randn(10_000)
    q = pycomm.ops.quantize(x, bits=4, bucket_size=512)
    x_hat = pycomm.ops.dequantize(q)               # same shape and dtype as x
    print(q.nbytes, x.numel() * 4)                 # 5280 vs 40000 bytes
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from pycomm import _C  # noqa: F401  (loads the library that registers torch.ops.pycomm)

__all__ = [
    "QuantizedTensor",
    "quantize",
    "quantize_with_error_feedback",
    "dequantize",
    "dequantize_sum",
    "record_bytes",
    "num_buckets",
    "bucket_table",
    "mixed_payload_bytes",
    "SUPPORTED_DTYPES",
    "segment_table",
    "topk_count",
    "topk",
    "densify",
    "dgc_compensate",
    "dgc_mask",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEADER_BYTES = 8
MAX_BUCKET_SIZE = 1 << 24


def _is_int(value: object) -> bool:
    """An int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bits_bucket(bits: int, bucket_size: int) -> None:
    if not _is_int(bits) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    if not _is_int(bucket_size) or bucket_size < 8 or bucket_size % 8 or bucket_size > MAX_BUCKET_SIZE:
        raise ValueError(f"bucket_size must be a positive multiple of 8 and at most 2^24, got {bucket_size!r}")


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def record_bytes(bits: int, bucket_size: int) -> int:
    """Bytes of one bucket record: 8 header bytes plus ``bucket_size * bits / 8`` packed bytes."""
    _check_bits_bucket(bits, bucket_size)
    return HEADER_BYTES + bucket_size * bits // 8


def num_buckets(numel: int, bucket_size: int) -> int:
    """Buckets needed for ``numel`` elements."""
    return -(-numel // bucket_size)


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor: the payload of bucket records and what is needed to decode it.

    Attributes:
        payload: uint8 ``[num_buckets, record_bytes(bits, bucket_size)]``; the bytes sent on the wire.
        bits: bits per element, 1..8.
        bucket_size: elements per bucket (a multiple of 8).
        numel: number of elements encoded.
        dtype: dtype of the original tensor (what :func:`dequantize` returns).
        shape: shape of the original tensor.
    """

    payload: torch.Tensor
    bits: int
    bucket_size: int
    numel: int
    dtype: torch.dtype
    shape: torch.Size

    def __post_init__(self) -> None:
        _check_bits_bucket(self.bits, self.bucket_size)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if math.prod(self.shape) != self.numel:
            raise ValueError(f"shape {tuple(self.shape)} does not hold numel={self.numel} elements")
        p = self.payload
        expected_record = record_bytes(self.bits, self.bucket_size)
        if p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] != expected_record:
            raise ValueError(
                f"payload must be uint8 of shape [num_buckets, {expected_record}] for bits={self.bits}, "
                f"bucket_size={self.bucket_size}; got {p.dtype} {tuple(p.shape)}")
        if p.shape[0] * self.bucket_size < self.numel:
            raise ValueError(
                f"payload holds {p.shape[0]} buckets of {self.bucket_size} elements, fewer than numel={self.numel}")

    @property
    def num_buckets(self) -> int:
        return self.payload.shape[0]

    @property
    def meta(self) -> torch.Tensor:
        """float32 ``[num_buckets, 2]``: each bucket's (min, unit) (a copy)."""
        return self.payload[:, :HEADER_BYTES].contiguous().view(torch.float32)

    @property
    def data(self) -> torch.Tensor:
        """uint8 ``[num_buckets, bucket_size * bits / 8]``: the packed levels (a view)."""
        return self.payload[:, HEADER_BYTES:]

    @property
    def nbytes(self) -> int:
        """Bytes of the payload: what sending this tensor costs."""
        return self.payload.numel()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def _quantize(x: torch.Tensor, residual: Optional[torch.Tensor], bits: int, bucket_size: int,
              stochastic: bool, seed: int) -> QuantizedTensor:
    _check_float(x, "x")
    _check_bits_bucket(bits, bucket_size)
    payload = torch.ops.pycomm.quantize(x.reshape(-1), residual, None, -1, bits, bucket_size, bool(stochastic),
                                        int(seed), 0, 0)
    return QuantizedTensor(payload, bits, bucket_size, x.numel(), x.dtype, x.shape)


def quantize(x: torch.Tensor, bits: int = 4, bucket_size: int = 512, stochastic: bool = True,
             seed: int = 0) -> QuantizedTensor:
    """Quantize ``x`` (flattened) with per-bucket max-min scaling.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape, CPU or CUDA.
        bits: bits per element, 1..8.
        bucket_size: elements per bucket, a positive multiple of 8.
        stochastic: unbiased stochastic rounding (Philox keyed by ``seed`` and the
            element's position) instead of round-to-nearest.
        seed: 64-bit seed for stochastic rounding; the same seed gives the same bytes on CPU and CUDA.

    Returns:
        A :class:`QuantizedTensor`. Per element, ``|x - dequantize(q)| <= unit / 2``
        (nearest) or ``< unit`` (stochastic), with ``unit = (max - min) / (2^bits - 1)`` of its bucket.
    """
    return _quantize(x, None, bits, bucket_size, stochastic, seed)


def quantize_with_error_feedback(x: torch.Tensor, residual: torch.Tensor, bits: int = 4, bucket_size: int = 512,
                                 stochastic: bool = True, seed: int = 0) -> QuantizedTensor:
    """Fused error feedback: ``x' = x + residual; q = Q(x'); residual = x' - dequantize(q)``, in one pass.

    ``residual`` is a contiguous float32 tensor with as many elements as ``x`` and is updated in place.
    Buckets holding NaN or Inf are encoded as NaN and leave their residual unchanged.
    """
    _check_float(x, "x")
    if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 or residual.numel() != x.numel():
        raise ValueError(f"residual must be a float32 tensor with {x.numel()} elements")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous (it is updated in place)")
    return _quantize(x, residual.view(-1), bits, bucket_size, stochastic, seed)


def dequantize(q: QuantizedTensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode ``q`` into a tensor of its original dtype and shape (or into ``out``, any float dtype)."""
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"dequantize expects a QuantizedTensor, got {type(q).__name__}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.payload.device)
    else:
        _check_float(out, "out")
        if out.numel() != q.numel or not out.is_contiguous():
            raise ValueError(f"out must be contiguous with {q.numel} elements, got shape {tuple(out.shape)}")
    torch.ops.pycomm.dequantize_into(q.payload, out.view(-1), None, q.bits, q.bucket_size)
    return out


def dequantize_sum(payloads: Union[Sequence[QuantizedTensor], torch.Tensor], bits: Optional[int] = None,
                   bucket_size: Optional[int] = None, numel: Optional[int] = None,
                   init: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum W quantized tensors (plus an optional ``init``) into one float32 tensor, in a single pass.

    Args:
        payloads: a sequence of :class:`QuantizedTensor` with equal bits, bucket_size and numel,
            or a uint8 tensor ``[W, num_buckets, record_bytes]`` (then ``bits``, ``bucket_size``
            and ``numel`` are required).
        init: optional float tensor of ``numel`` elements added to the sum.

    Returns:
        float32 tensor of ``numel`` elements: ``init + sum_w dequantize(payloads[w])``, summed in that order.
    """
    if isinstance(payloads, torch.Tensor):
        if bits is None or bucket_size is None or numel is None:
            raise ValueError("bits, bucket_size and numel are required when payloads is a tensor")
        _check_bits_bucket(bits, bucket_size)
        stacked = payloads
        if stacked.dim() != 3 or stacked.dtype != torch.uint8:
            raise ValueError(f"payloads must be uint8 [W, num_buckets, record_bytes], got {stacked.dtype} "
                             f"{tuple(stacked.shape)}")
        if stacked.shape[1] * bucket_size < numel:
            raise ValueError(f"payloads hold {stacked.shape[1]} buckets of {bucket_size}, fewer than numel={numel}")
    else:
        qs = list(payloads)
        if not qs:
            raise ValueError("dequantize_sum needs at least one payload")
        first = qs[0]
        for q in qs:
            if (q.bits, q.bucket_size, q.numel, q.num_buckets) != (first.bits, first.bucket_size, first.numel,
                                                                   first.num_buckets):
                raise ValueError("all payloads must share bits, bucket_size, numel and num_buckets")
        bits, bucket_size, numel = first.bits, first.bucket_size, first.numel
        stacked = torch.stack([q.payload for q in qs])
    if init is not None:
        _check_float(init, "init")
        if init.numel() != numel:
            raise ValueError(f"init must have numel={numel} elements, got {init.numel()}")
        init = init.reshape(-1)
    out = torch.ops.pycomm.dequantize_sum(stacked, init, None, 0, bits, bucket_size)
    return out[:numel]


def bucket_table(segments: Sequence[tuple[int, int]], bucket_size: int, pad_to_multiple: int = 1,
                 device: Union[str, torch.device, None] = None,
                 bits: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Build a bucket table: each (offset, length) segment of a flat tensor gets its own buckets.

    Segments must not overlap. Without ``bits`` the table has one ``(offset, length)`` row per
    bucket, padded with empty rows to a multiple of ``pad_to_multiple`` (for splitting into equal
    chunks). Built once per layout; pass it to the ``torch.ops.pycomm`` kernels as ``bucket_table``.

    With ``bits`` (one bit width in 1..8 per segment, in the order of ``segments``) the table is a
    *mixed* table of ``(offset, length, bits, byte_offset)`` rows: each bucket is quantized with its
    segment's bits and its record starts at ``byte_offset`` of a flat uint8 payload (records packed
    back to back, each ``record_bytes(bits, bucket_size)`` bytes; see :func:`mixed_payload_bytes`).
    Pass it to the ops with ``bits=0``. The rows are then split into ``pad_to_multiple`` chunks
    (the world size, for :func:`pycomm.distributed.quantized_all_reduce`) of equal row counts AND
    equal byte sizes: buckets are assigned to chunks greedily (largest bit width first, to the
    chunk with the fewest bits so far), so rows are no longer in segment order, and each chunk is
    topped up with empty padding rows whose bit widths (as small as possible) even out the bytes.
    The padding costs at most a few small records per chunk. With ``pad_to_multiple=1`` the rows
    stay in segment order and nothing is added.
    """
    _check_bits_bucket(1, bucket_size)
    if not _is_int(pad_to_multiple) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be a positive integer, got {pad_to_multiple!r}")
    segments = list(segments)
    if bits is not None:
        bits = list(bits)
        if len(bits) != len(segments):
            raise ValueError(f"bits must have one entry per segment ({len(segments)}), got {len(bits)}")
        for b in bits:
            if not _is_int(b) or not 1 <= b <= 8:
                raise ValueError(f"bits must be integers in [1, 8], got {b!r}")
    order = sorted(range(len(segments)), key=lambda i: segments[i])
    rows: list[tuple[int, ...]] = []
    end = -1
    for i in order:
        offset, length = segments[i]
        if isinstance(offset, bool) or isinstance(length, bool) or offset < 0 or length < 0:
            raise ValueError(f"segment ({offset!r}, {length!r}) must have a non-negative int offset and length")
        if offset < end:
            raise ValueError(f"segment ({offset}, {length}) overlaps the previous one")
        end = offset + length
        for start in range(offset, offset + length, bucket_size):
            row = (start, min(bucket_size, offset + length - start))
            rows.append(row if bits is None else row + (bits[i],))
    if bits is None:
        while len(rows) % pad_to_multiple:
            rows.append((0, 0))
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 2)
    if pad_to_multiple > 1:
        rows = _balanced_chunks(rows, pad_to_multiple)
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
    sizes = HEADER_BYTES + table[:, 2] * (bucket_size // 8)
    byte_offsets = torch.cumsum(sizes, 0) - sizes
    return torch.cat([table, byte_offsets[:, None]], dim=1).to(device)


def _balanced_chunks(rows: list[tuple[int, ...]], chunks: int) -> list[tuple[int, ...]]:
    """Order (offset, length, bits) rows into ``chunks`` runs of equal length and equal bit sums.

    Chunk bytes are ``8 * rows + bucket_size / 8 * sum(bits)``, so equal row counts and equal bit
    sums give equal bytes. Empty padding rows (bits 1..8, chosen as small as possible) fill the
    gaps. Tries R = ceil(n / chunks) rows per chunk, then R + 1, ... until padding can even out
    the sums (each extra row per chunk adds room for 7 more bits, so this ends within a few steps).
    """
    n = len(rows)
    by_bits = sorted(range(n), key=lambda i: (-rows[i][2], i))
    per_chunk = -(-n // chunks)
    while True:
        members: list[list[int]] = [[] for _ in range(chunks)]
        sums = [0] * chunks
        # Padding rows count as 1 bit (their minimum) so that chunks with padding get fewer real bits.
        heap = [(0, c) for c in range(chunks)]
        pads_total = chunks * per_chunk - n
        items = [rows[i][2] for i in by_bits] + [1] * pads_total
        ids = by_bits + [-1] * pads_total
        full: list[tuple[int, int]] = []
        for b, i in zip(items, ids):
            total, c = heapq.heappop(heap)
            members[c].append(i)
            sums[c] = total + b
            if len(members[c]) < per_chunk:
                heapq.heappush(heap, (sums[c], c))
        target = max(sums)
        pads = [sum(1 for i in m if i < 0) for m in members]
        if all(target - sums[c] <= 7 * pads[c] for c in range(chunks)):
            break
        per_chunk += 1
    out: list[tuple[int, ...]] = []
    for c in range(chunks):
        real = sorted(i for i in members[c] if i >= 0)
        out.extend(rows[i] for i in real)
        extra = target - sums[c]  # bits to add on top of 1 per padding row
        for _ in range(pads[c]):
            add = min(7, extra)
            extra -= add
            out.append((0, 0, 1 + add))
    return out


def mixed_payload_bytes(table: torch.Tensor, bucket_size: int) -> int:
    """Bytes of the payload of a mixed (4-column) bucket table: the end of its last record."""
    if table.dim() != 2 or table.shape[1] != 4:
        raise ValueError(f"expected a mixed bucket table of shape [rows, 4], got {tuple(table.shape)}")
    if table.shape[0] == 0:
        return 0
    last = table[-1].tolist()
    return int(last[3]) + record_bytes(int(last[2]), bucket_size)


# ---- fake kernels (shape propagation for torch.compile / meta tensors) ----

@torch.library.register_fake("pycomm::quantize")
def _quantize_fake(x, residual, bucket_table, num_buckets, bits, bucket_size, stochastic, seed, skip_begin,
                   skip_end, host_table=None, chunk_row_begin=-1):
    if bucket_table is not None and bucket_table.shape[1] == 4:
        # The payload's length depends on the table's contents.
        return x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)
    if num_buckets < 0:
        num_buckets = bucket_table.shape[0] if bucket_table is not None else (x.numel() + bucket_size - 1) // bucket_size
    return x.new_empty((num_buckets, HEADER_BYTES + bucket_size * bits // 8), dtype=torch.uint8)


@torch.library.register_fake("pycomm::dequantize_into")
def _dequantize_into_fake(payload, out, bucket_table, bits, bucket_size, host_table=None):
    return None


@torch.library.register_fake("pycomm::dequantize_sum")
def _dequantize_sum_fake(payloads, init, bucket_table, init_bucket_begin, bits, bucket_size, host_table=None):
    if bucket_table is not None and bucket_table.shape[1] == 4:
        rows = torch.library.get_ctx().new_dynamic_size()
        return payloads.new_empty((rows * bucket_size,), dtype=torch.float32)
    return payloads.new_empty((payloads.shape[1] * bucket_size,), dtype=torch.float32)


# ---- DGC: momentum correction, top-k selection, masking, densify ----

def segment_table(segments: Sequence[tuple[int, int]], device: Union[str, torch.device, None] = None,
                  counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Segment table of the layers of a flat buffer, for one launch per bucket.

    Args:
        segments: ``(offset, length)`` of each layer.
        device: where the table lives (that of the tensors it is used with).
        counts: optional number of elements :func:`topk` keeps in each segment (per-layer
            densities in one launch; see :func:`topk_count`), each in ``[0, length]``.

    Returns:
        int64 ``[S, 2]`` rows ``(offset, length)``, or ``[S, 3]`` rows ``(offset, length, count)``
        with ``counts``.
    """
    segments = [(offset, length) for offset, length in segments]
    for offset, length in segments:
        if isinstance(offset, bool) or isinstance(length, bool):
            raise ValueError(f"segment ({offset!r}, {length!r}) must have int offset and length, not bool")
    segments = [(int(offset), int(length)) for offset, length in segments]
    for offset, length in segments:
        if offset < 0 or length < 0:
            raise ValueError(f"segment ({offset}, {length}) must have a non-negative offset and length")
    if counts is None:
        return torch.tensor(segments, dtype=torch.int64, device=device).reshape(-1, 2)
    counts = list(counts)
    if any(isinstance(c, bool) for c in counts):
        raise ValueError(f"counts must be ints, not bools, got {counts!r}")
    counts = [int(c) for c in counts]
    if len(counts) != len(segments):
        raise ValueError(f"counts has {len(counts)} entries for {len(segments)} segments")
    for (offset, length), count in zip(segments, counts):
        if not 0 <= count <= length:
            raise ValueError(f"segment ({offset}, {length}) cannot keep {count} elements: counts must be in "
                             f"[0, length]")
    rows = [(offset, length, count) for (offset, length), count in zip(segments, counts)]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 3)


def topk_count(numel: int, density: float) -> int:
    """Elements kept at ``density``: ``ceil(numel * density)``, at least 1 for a non-empty tensor.

    The rule of the C++ ops (``csrc/include/pycomm/segments.h``); use it to build the counts of
    a :func:`segment_table` from per-layer densities.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(numel * density)))


def topk(x: torch.Tensor, density: float, exact: bool = False, sample_ratio: float = 0.01, seed: int = 0,
         segments: Optional[torch.Tensor] = None,
         host_segments: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ceil(numel * density)`` elements of ``x`` (flattened) with the largest magnitude.

    Args:
        x: float32/float16/bfloat16 tensor, CPU or CUDA.
        density: fraction kept, in (0, 1] (validated, but not used with a 3-column table).
        exact: exact selection; otherwise (default) large tensors estimate a threshold from a
            strided sample (``sample_ratio`` of the elements, Philox-random start), collect the
            candidates above it in one pass and select exactly among them, which gives the same
            set as the exact top-k unless the threshold search fails (then it lowers the threshold).
        segments: optional :func:`segment_table`; then each segment keeps its own
            ``ceil(length * density)``, or, with a ``counts`` column, its own count (per-layer
            densities in one launch; a count outside ``[0, length]`` raises).
        host_segments: optional CPU copy of a CUDA ``segments`` table; with it the CUDA op sizes its
            outputs without a device-to-host copy (no synchronisation).

    Returns:
        ``(values, indices)``: values in ``x``'s dtype, flat indices (int32 when they fit),
        ascending within each segment. Ties in magnitude go to the lower index; NaN ranks first.
    """
    _check_float(x, "x")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
    return torch.ops.pycomm.topk_magnitude(x.reshape(-1), segments, float(density), bool(exact),
                                           float(sample_ratio), int(seed), host_segments)


def _check_first_bad(first_bad: Optional[torch.Tensor], like: torch.Tensor) -> None:
    if first_bad is None:
        return
    if (not isinstance(first_bad, torch.Tensor) or first_bad.dtype != torch.int64 or first_bad.numel() != 1
            or not first_bad.is_contiguous() or first_bad.device != like.device):
        raise ValueError(f"first_bad must be a contiguous one-element int64 tensor on {like.device}, got "
                         f"{first_bad.dtype if isinstance(first_bad, torch.Tensor) else type(first_bad).__name__}")


def densify(values: torch.Tensor, indices: torch.Tensor, numel: int,
            first_bad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum (values, indices) payloads, of any matching shape (e.g. ``[W, k]``), into a dense float32 tensor.

    Every index is checked against ``[0, numel)`` before anything is written; an index out of
    range raises ``RuntimeError`` (on CUDA the op reads that check on the host: it waits for the
    stream). Duplicates add up, in payload order.

    ``first_bad``: a one-element int64 tensor on the values' device. Then nothing raises and, on
    CUDA, nothing waits: it receives the position of the first index out of range, or -1, and a
    bad index gives all zeros. Read it later (e.g. copied to the host without blocking).
    """
    _check_float(values, "values")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have the same shape")
    if isinstance(numel, bool):
        raise ValueError(f"numel must be an int, got {numel!r}")
    _check_first_bad(first_bad, values)
    return torch.ops.pycomm.densify(values, indices, int(numel), first_bad)


def dgc_compensate(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, momentum: float, nesterov: bool = False,
                   clip_norm: float = 0.0, segments: Optional[torch.Tensor] = None) -> None:
    """DGC momentum correction in place: ``u = m*u + g; v += u`` (Nesterov: ``u = m*(u + g); v += u + g``).

    ``u`` and ``v`` are float32 with as many elements as ``grad``. With ``clip_norm > 0`` each
    segment's gradient is first scaled to L2 norm at most ``clip_norm``.
    """
    _check_float(grad, "grad")
    torch.ops.pycomm.dgc_compensate(grad.reshape(-1), u, v, segments, float(momentum), bool(nesterov),
                                    float(clip_norm))


def dgc_mask(v: torch.Tensor, indices: torch.Tensor, u: Optional[torch.Tensor] = None,
             first_bad: Optional[torch.Tensor] = None) -> None:
    """Zero ``v`` (and ``u``: momentum factor masking) at ``indices``, in place.

    An index outside ``[0, v.numel())`` raises ``RuntimeError`` before anything is written (on
    CUDA that check waits for the stream). With ``first_bad`` (as for :func:`densify`) nothing
    raises or waits: it receives the first bad position, or -1, and a bad index writes nothing.
    The DGC hook passes one on CUDA, where the indices are its own top-k.
    """
    if isinstance(v, torch.Tensor):
        _check_first_bad(first_bad, v)
    torch.ops.pycomm.dgc_mask(v, u, indices, first_bad)


@torch.library.register_fake("pycomm::topk_magnitude")
def _topk_magnitude_fake(x, segments, density, exact, sample_ratio, seed, host_segments=None):
    if segments is None:
        total = topk_count(x.numel(), density)
    else:  # data-dependent on the table's contents
        total = torch.library.get_ctx().new_dynamic_size()
    index_dtype = torch.int32 if x.numel() <= 2**31 - 1 else torch.int64
    return x.new_empty((total,)), x.new_empty((total,), dtype=index_dtype)


@torch.library.register_fake("pycomm::densify")
def _densify_fake(values, indices, numel, first_bad=None):
    return values.new_empty((numel,), dtype=torch.float32)


@torch.library.register_fake("pycomm::dgc_compensate")
def _dgc_compensate_fake(grad, u, v, segments, momentum, nesterov, clip_norm):
    return None


@torch.library.register_fake("pycomm::dgc_mask")
def _dgc_mask_fake(v, u, indices, first_bad=None):
    return None


# ---- Philox variates: counter-based Gaussian / Rademacher noise (issue 4) ----
#
# Zeroth-order (SPSA / MeZO) training regenerates its perturbation z from a seed
# instead of storing it. These ops compute z on the fly from Philox4x32-10: the
# variate of an element depends only on (seed, global element index), where the
# global index of element j of tensor i in a list is
# ``offset + sum(numel of tensors before i) + j``. The results are therefore
# the same on CPU and CUDA, for any thread count or launch configuration, and
# however the parameters are split into tensors. Definitions (Box-Muller on
# Philox words with device-independent log / sin / cos / sqrt, one bit per
# Rademacher sign, the summation order of ``philox_dot``):
# ``csrc/include/pycomm/philox_variates.h``.

__all__ += [
    "PHILOX_DISTRIBUTIONS",
    "philox_normal",
    "philox_rademacher",
    "philox_axpy_",
    "philox_perturbed_copy",
    "philox_dot",
    "philox_axpy_multi_",
    "philox_dot_multi",
]

PHILOX_DISTRIBUTIONS = {"gaussian": 0, "rademacher": 1}
_INT64_MAX = 2**63 - 1


def _philox_seed(seed: int) -> int:
    """A 64-bit seed as the int64 the ops take (seeds in [2^63, 2^64) wrap to the same 64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits ([-2^63, 2^64)), got {seed}")
    return seed - 2**64 if seed > _INT64_MAX else seed


def _philox_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _philox_distribution(distribution: str) -> int:
    if distribution not in PHILOX_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {sorted(PHILOX_DISTRIBUTIONS)}, got {distribution!r}")
    return PHILOX_DISTRIBUTIONS[distribution]


def _philox_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a real number, got {type(alpha).__name__}")
    return float(alpha)


def _philox_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (str, bytes, torch.Tensor)) or not isinstance(seeds, Sequence):
        raise ValueError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
    return [_philox_seed(s) for s in seeds]


def _philox_alphas(alphas: Union[torch.Tensor, Sequence[float]], count: int, device: torch.device) -> torch.Tensor:
    """``count`` alphas as a float32 / float64 tensor on ``device`` or the CPU (a sequence becomes a CPU tensor)."""
    if not isinstance(alphas, torch.Tensor):
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
            raise ValueError(f"alphas must be a tensor or a sequence of numbers, got {type(alphas).__name__}")
        alphas = torch.tensor([_philox_alpha(a) for a in alphas], dtype=torch.float64)
    if alphas.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"alphas must be float32 or float64, got {alphas.dtype}")
    if alphas.dim() > 1 or alphas.numel() != count:
        raise ValueError(f"need one alpha per seed ({count}), as a 0-d or 1-D tensor; got shape {tuple(alphas.shape)}")
    if alphas.device != device and alphas.device.type != "cpu":
        raise ValueError(f"alphas must be on the tensors' device ({device}) or on the CPU, got {alphas.device}")
    return alphas.reshape(-1)


def _philox_tensors(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], offset: int, in_place: bool
                    ) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Sequence):
        raise ValueError(f"tensors must be a tensor or a sequence of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    total = 0
    for i, t in enumerate(tensors):
        _check_float(t, f"tensors[{i}]")
        if t.device != tensors[0].device:
            raise ValueError(f"all tensors must be on one device: tensors[0] is on {tensors[0].device}, "
                             f"tensors[{i}] on {t.device}")
        if in_place and not t.is_contiguous():
            raise ValueError(f"tensors[{i}] must be contiguous (it is updated in place)")
        total += t.numel()
    if in_place:
        seen = {}
        for i, t in enumerate(tensors):
            if t.numel() and t.data_ptr() in seen:
                raise ValueError(f"tensors[{i}] shares memory with tensors[{seen[t.data_ptr()]}]")
            seen.setdefault(t.data_ptr(), i)
    if total > _INT64_MAX - offset:
        raise ValueError(f"offset + total elements ({offset} + {total}) exceeds 2^63 - 1")
    return tensors


def _philox_variates(n: int, seed: int, offset: int, distribution: int, dtype: torch.dtype,
                     device: Union[str, torch.device]) -> torch.Tensor:
    n = _philox_count(n, "n")
    offset = _philox_count(offset, "offset")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if n > _INT64_MAX - offset:
        raise ValueError(f"offset + n ({offset} + {n}) exceeds 2^63 - 1")
    like = torch.empty(0, dtype=dtype, device=device)
    return torch.ops.pycomm.philox_variates(like, n, _philox_seed(seed), offset, distribution)


def philox_normal(n: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Standard normal variates of the global indices ``offset .. offset + n - 1`` under ``seed``.

    A pure function of (seed, index): ``philox_normal(n, s, offset)`` equals
    ``philox_normal(offset + n, s)[offset:]``, on any device, bit for bit. The values are
    computed in float32 (Box-Muller from Philox4x32-10, |z| <= 6.66) and rounded to ``dtype``.

    Args:
        n: number of variates (1-D result).
        seed: 64-bit seed (an int in [-2^63, 2^64)).
        offset: global index of the first variate, >= 0.
        dtype: float32, float16 or bfloat16.
        device: where to compute them.
    """
    return _philox_variates(n, seed, offset, 0, dtype, device)


def philox_rademacher(n: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Random signs (+1 / -1, each with probability 1/2) of the global indices ``offset .. offset + n - 1``.

    One Philox bit per element; same contract as :func:`philox_normal`.
    """
    return _philox_variates(n, seed, offset, 1, dtype, device)


def philox_axpy_(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seed: int,
                 alpha: Union[float, torch.Tensor], distribution: str = "gaussian", offset: int = 0) -> None:
    """In place, ``t += alpha * z`` for every tensor, with ``z`` regenerated from ``seed`` (never stored).

    The tensors are numbered as one concatenation: element j of ``tensors[i]`` uses the
    variate of global index ``offset + sum(numel of tensors[:i]) + j``, so splitting the
    parameters differently, the device and the thread count do not change the result.
    Each element is computed in float32 as ``t + alpha * z`` (two roundings, no FMA;
    ``alpha`` is rounded to float32 first), then rounded to the tensor's dtype.

    Args:
        tensors: a tensor or a sequence of contiguous float32 / float16 / bfloat16 tensors on one
            device, not sharing memory. Call under ``torch.no_grad()`` for parameters.
        seed: 64-bit seed.
        alpha: scale of the perturbation (e.g. ``+eps``, ``-2 * eps``, ``-lr * g``): a number, or a
            one-element float32 / float64 tensor on the tensors' device (read by the kernel, so a
            CUDA caller does not wait for it) or on the CPU. ``alpha == 0`` (after rounding to
            float32) leaves the tensors untouched, bit for bit.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        offset: global index of the first element of ``tensors[0]``, >= 0.

    Note: ``t + eps*z - 2*eps*z + eps*z`` is not exactly ``t`` in floating point.
    """
    if isinstance(alpha, torch.Tensor):
        philox_axpy_multi_(tensors, [seed], alpha.reshape(-1) if alpha.dim() == 0 else alpha, distribution, offset)
        return
    dist = _philox_distribution(distribution)
    offset = _philox_count(offset, "offset")
    ts = _philox_tensors(tensors, offset, in_place=True)
    if ts:  # the op raises on a leaf that requires grad and bumps the versions (csrc/ops.cpp)
        torch.ops.pycomm.philox_axpy_(ts, _philox_seed(seed), _philox_alpha(alpha), dist, offset)


def philox_axpy_multi_(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seeds: Sequence[int],
                       alphas: Union[torch.Tensor, Sequence[float]], distribution: str = "gaussian",
                       offset: int = 0) -> None:
    """In place, ``t += Σ_k alphas[k] * z(seeds[k])`` in one pass over the tensors.

    Bit for bit the K calls ``philox_axpy_(tensors, seeds[k], alphas[k])`` for k = 0, 1, ...
    in order (each alpha rounded to float32; each step rounded to the tensor's dtype; a zero
    alpha skipped), but the tensors are read and written once and, on CUDA, one launch covers
    up to 32 directions.

    Args:
        tensors: as for :func:`philox_axpy_`.
        seeds: the K 64-bit seeds.
        alphas: K scales: a float32 / float64 tensor on the tensors' device (the kernel reads it,
            so a CUDA caller never waits for the host) or on the CPU, or a sequence of numbers.
        distribution, offset: as for :func:`philox_axpy_`.
    """
    dist = _philox_distribution(distribution)
    offset = _philox_count(offset, "offset")
    seeds = _philox_seeds(seeds)
    ts = _philox_tensors(tensors, offset, in_place=True)
    device = ts[0].device if ts else torch.device("cpu")
    alphas = _philox_alphas(alphas, len(seeds), device)
    if ts and seeds:
        torch.ops.pycomm.philox_axpy_multi_(ts, seeds, alphas, dist, offset)


def philox_perturbed_copy(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seed: int, alpha: float,
                          distribution: str = "gaussian", offset: int = 0) -> list[torch.Tensor]:
    """Out of place: new contiguous tensors ``t + alpha * z``, exactly what :func:`philox_axpy_` would write.

    Inputs may be non-contiguous (their elements are numbered in row-major order).
    Returns a list with one tensor per input, same shapes and dtypes.
    """
    dist = _philox_distribution(distribution)
    offset = _philox_count(offset, "offset")
    ts = _philox_tensors(tensors, offset, in_place=False)
    if not ts:
        return []
    return list(torch.ops.pycomm.philox_perturbed_copy(ts, _philox_seed(seed), _philox_alpha(alpha), dist, offset))


def philox_dot(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seed: int, distribution: str = "gaussian",
               offset: int = 0) -> float:
    """``<t, z>`` over all tensors (numbered as in :func:`philox_axpy_`), as a Python float.

    Each product ``double(t_i) * double(z_i)`` is exact; the products are summed in double in a
    fixed order (chunks of 4096 global indices, 32 interleaved lanes per chunk, halving trees;
    see ``philox_variates.h``), so CPU and CUDA return the same double bit for bit, for any
    tensor split. On CUDA this synchronizes (``.item()``); :func:`philox_dot_multi` returns the
    float64 device tensor without waiting.
    """
    dist = _philox_distribution(distribution)
    offset = _philox_count(offset, "offset")
    ts = _philox_tensors(tensors, offset, in_place=False)
    if not ts:
        return 0.0
    return torch.ops.pycomm.philox_dot(ts, _philox_seed(seed), dist, offset).item()


def philox_dot_multi(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seeds: Sequence[int],
                     distribution: str = "gaussian", offset: int = 0) -> torch.Tensor:
    """``<t, z(seeds[k])>`` for every seed, as a float64 tensor of shape ``[K]`` on the tensors' device.

    Element k equals ``philox_dot(tensors, seeds[k], distribution, offset)`` bit for bit (same
    summation order). The tensors are read once for all K directions on the CPU; on CUDA one
    launch covers up to 32 directions and nothing waits for the device (no ``.item()``).
    An empty tensor list gives K zeros on the CPU.
    """
    dist = _philox_distribution(distribution)
    offset = _philox_count(offset, "offset")
    seeds = _philox_seeds(seeds)
    ts = _philox_tensors(tensors, offset, in_place=False)
    if not ts:
        return torch.zeros(len(seeds), dtype=torch.float64)
    return torch.ops.pycomm.philox_dot_multi(ts, seeds, dist, offset)


@torch.library.register_fake("pycomm::philox_variates")
def _philox_variates_fake(like, n, seed, offset, distribution):
    return like.new_empty((n,))


@torch.library.register_fake("pycomm::philox_axpy_")
def _philox_axpy_fake(tensors, seed, alpha, distribution, offset):
    return None


@torch.library.register_fake("pycomm::philox_perturbed_copy")
def _philox_perturbed_copy_fake(tensors, seed, alpha, distribution, offset):
    return [t.new_empty(t.shape) for t in tensors]


@torch.library.register_fake("pycomm::philox_dot")
def _philox_dot_fake(tensors, seed, distribution, offset):
    return tensors[0].new_empty((), dtype=torch.float64)


@torch.library.register_fake("pycomm::philox_axpy_multi_")
def _philox_axpy_multi_fake(tensors, seeds, alphas, distribution, offset):
    return None


@torch.library.register_fake("pycomm::philox_dot_multi")
def _philox_dot_multi_fake(tensors, seeds, distribution, offset):
    return tensors[0].new_empty((len(seeds),), dtype=torch.float64)

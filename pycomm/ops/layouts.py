"""Layouts of flat buffers: bucket tables (with the chunk balancing of mixed bit widths), segment tables
and the byte sizes of bucket records (``csrc/include/pycomm/bucket_layout.h``, ``segments.h``)."""

from __future__ import annotations

import heapq
from typing import Optional, Sequence, Union

import torch

from pycomm.ops.validation import HEADER_BYTES, check_bits_bucket, is_int

__all__ = ["record_bytes", "num_buckets", "bucket_table", "mixed_payload_bytes", "segment_table"]


def record_bytes(bits: int, bucket_size: int) -> int:
    """Bytes of one bucket record: 8 header bytes plus ``bucket_size * bits / 8`` packed bytes."""
    check_bits_bucket(bits, bucket_size)
    return HEADER_BYTES + bucket_size * bits // 8


def num_buckets(numel: int, bucket_size: int) -> int:
    """Buckets needed for ``numel`` elements."""
    return -(-numel // bucket_size)


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
    check_bits_bucket(1, bucket_size)
    if not is_int(pad_to_multiple) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be a positive integer, got {pad_to_multiple!r}")
    segments = list(segments)
    if bits is not None:
        bits = list(bits)
        if len(bits) != len(segments):
            raise ValueError(f"bits must have one entry per segment ({len(segments)}), got {len(bits)}")
        for b in bits:
            if not is_int(b) or not 1 <= b <= 8:
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


def segment_table(segments: Sequence[tuple[int, int]], device: Union[str, torch.device, None] = None,
                  counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Segment table of the layers of a flat buffer, for one launch per bucket.

    Args:
        segments: ``(offset, length)`` of each layer.
        device: where the table lives (that of the tensors it is used with).
        counts: optional number of elements :func:`pycomm.ops.topk` keeps in each segment (per-layer
            densities in one launch; see :func:`pycomm.ops.topk_count`), each in ``[0, length]``.

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

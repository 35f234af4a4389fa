"""Pure-numpy reference decoders for the fuzz tests, written from the byte format
(csrc/include/pycomm/quant_format.h) and the bucket layouts (csrc/include/pycomm/bucket_layout.h),
independently of the kernels, plus the helpers that surround buffers with canaries and poison.

Everything here computes with Python ints (no overflow) and float32 numpy arithmetic rounded after
every operation, as the format specifies (value = min + level * unit, two float32 roundings).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

HEADER_BYTES = 8
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT64_MAX = 2**63 - 1


def record_bytes(bits: int, bucket_size: int) -> int:
    return HEADER_BYTES + bucket_size * bits // 8


def decode_records(records: np.ndarray, bits: int, bucket_size: int) -> np.ndarray:
    """float32 [n, bucket_size]: every level (padding included) of n records uint8 [n, record_bytes]."""
    records = np.ascontiguousarray(records, dtype=np.uint8).reshape(-1, record_bytes(bits, bucket_size))
    n = records.shape[0]
    header = records[:, :HEADER_BYTES].copy().view("<f4").astype(np.float32)  # [n, 2]: min, unit
    data = records[:, HEADER_BYTES:].reshape(n, bucket_size // 8, bits).astype(np.uint64)
    words = np.zeros((n, bucket_size // 8), dtype=np.uint64)
    for i in range(bits):  # group word: bytes little-endian
        words |= data[:, :, i] << np.uint64(8 * i)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    levels = (words[:, :, None] >> shifts) & np.uint64((1 << bits) - 1)
    levels = levels.reshape(n, bucket_size).astype(np.float32)
    with np.errstate(all="ignore"):
        scaled = (levels * header[:, 1:2]).astype(np.float32)
        return (header[:, 0:1] + scaled).astype(np.float32)


def is_zero_record(record: np.ndarray) -> bool:
    return not np.any(record[:HEADER_BYTES])


def clamp_range(offset: int, length: int, numel: int, bucket_size: int) -> tuple[int, int]:
    """BucketLayout::range's clamping: the part of [offset, offset + length) inside [0, numel),
    at most bucket_size long (computed exactly, with Python ints)."""
    offset = min(max(offset, 0), numel)
    length = max(min(length, bucket_size, numel - offset), 0)
    return offset, length


def layout_range(table: Optional[np.ndarray], row: int, numel: int, bucket_size: int) -> tuple[int, int]:
    """Elements of bucket `row` (a table row, or a bucket of the identity layout)."""
    if table is None:
        return clamp_range(row * bucket_size, bucket_size, numel, bucket_size)
    return clamp_range(int(table[row, 0]), int(table[row, 1]), numel, bucket_size)


def _store(out: torch.Tensor, offset: int, values: np.ndarray) -> None:
    out[offset:offset + values.size] = torch.from_numpy(values.copy()).to(out.dtype)


def dequantize_into_ref(payload: np.ndarray, out: torch.Tensor, table: Optional[np.ndarray], bits: int,
                        bucket_size: int) -> torch.Tensor:
    """What dequantize_into leaves in `out` (flat; its elements outside every bucket keep their values).
    Rows are applied in order (the kernels run these small cases on one thread)."""
    expected = out.detach().clone().reshape(-1)
    numel = expected.numel()
    decoded = decode_records(payload, bits, bucket_size)
    for k in range(payload.shape[0]):
        offset, length = layout_range(table, k, numel, bucket_size)
        _store(expected, offset, decoded[k, :length])
    return expected


def mixed_dequantize_into_ref(payload: np.ndarray, out: torch.Tensor, table: np.ndarray,
                              bucket_size: int) -> torch.Tensor:
    expected = out.detach().clone().reshape(-1)
    numel = expected.numel()
    for k in range(table.shape[0]):
        bits, at = int(table[k, 2]), int(table[k, 3])
        record = payload[at:at + record_bytes(bits, bucket_size)]
        offset, length = layout_range(table, k, numel, bucket_size)
        _store(expected, offset, decode_records(record, bits, bucket_size)[0, :length])
    return expected


def _start_sum(init: Optional[torch.Tensor], table: Optional[np.ndarray], row: int, bucket_size: int) -> np.ndarray:
    acc = np.zeros(bucket_size, dtype=np.float32)
    if init is not None:
        flat = init.detach().reshape(-1).float().numpy()
        offset, length = layout_range(table, row, flat.size, bucket_size)
        acc[:length] = flat[offset:offset + length]
    return acc


def dequantize_sum_ref(payloads: np.ndarray, init: Optional[torch.Tensor], table: Optional[np.ndarray],
                       init_bucket_begin: int, bits: int, bucket_size: int) -> np.ndarray:
    """float32 [num_buckets * bucket_size]: init's buckets (rows init_bucket_begin + k) plus every
    source's decoded bucket k; an all-zero header (a zero record) adds nothing."""
    sources, num_buckets = payloads.shape[:2]
    out = np.zeros((num_buckets, bucket_size), dtype=np.float32)
    for k in range(num_buckets):
        acc = _start_sum(init, table, init_bucket_begin + k, bucket_size)
        for s in range(sources):
            record = payloads[s, k]
            if not is_zero_record(record):
                with np.errstate(all="ignore"):
                    acc = (acc + decode_records(record, bits, bucket_size)[0]).astype(np.float32)
        out[k] = acc
    return out.reshape(-1)


def mixed_rows_spanning(table: np.ndarray, begin: int, nbytes: int, bucket_size: int) -> Optional[int]:
    """Rows from `begin` whose records span exactly nbytes, or None (no row boundary there)."""
    rows = table.shape[0]
    if not 0 <= begin <= rows or nbytes < 0:
        return None
    ends = [int(table[r, 3]) for r in range(rows)]
    total = ends[-1] + record_bytes(int(table[-1, 2]), bucket_size) if rows else 0
    ends.append(total)
    target = ends[begin] + nbytes
    for r in range(begin, rows + 1):
        if ends[r] == target:
            return r - begin
    return None


def mixed_dequantize_sum_ref(payloads: np.ndarray, init: Optional[torch.Tensor], table: np.ndarray,
                             begin: int, bucket_size: int) -> np.ndarray:
    sources = payloads.shape[0]
    count = mixed_rows_spanning(table, begin, payloads.shape[1], bucket_size)
    assert count is not None
    out = np.zeros((count, bucket_size), dtype=np.float32)
    for k in range(count):
        row = begin + k
        bits = int(table[row, 2])
        at = int(table[row, 3]) - int(table[begin, 3])
        acc = _start_sum(init, table, row, bucket_size)
        for s in range(sources):
            record = payloads[s, at:at + record_bytes(bits, bucket_size)]
            if not is_zero_record(record):
                with np.errstate(all="ignore"):
                    acc = (acc + decode_records(record, bits, bucket_size)[0]).astype(np.float32)
        out[k] = acc
    return out.reshape(-1)


def packed_mixed_table(rows: Sequence[tuple[int, int, int]], bucket_size: int) -> np.ndarray:
    """int64 [rows, 4] (offset, length, bits, byte_offset) with the records packed from byte 0."""
    table = np.zeros((len(rows), 4), dtype=np.int64)
    at = 0
    for k, (offset, length, bits) in enumerate(rows):
        table[k] = (offset, length, bits, at)
        at += record_bytes(bits, bucket_size)
    return table


def mixed_total_bytes(table: np.ndarray, bucket_size: int) -> int:
    return sum(record_bytes(int(b), bucket_size) for b in table[:, 2]) if table.shape[0] else 0


# -- canaries and poison -----------------------------------------------------------------------


def embed(values: torch.Tensor, before: int, after: int, fill: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(big, view): `view` holds `values` (contiguous, same shape) inside a larger tensor `big`
    whose other elements are `fill`, so that a read outside `view` sees `fill` and a write
    outside it changes `big`."""
    flat = values.reshape(-1)
    big = torch.full((before + flat.numel() + after,), fill, dtype=values.dtype)
    big[before:before + flat.numel()] = flat
    return big, big[before:before + flat.numel()].view(values.shape)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, for bit-exact comparisons that treat NaN like any other value."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal element for element: bit for bit, except that any NaN matches any NaN."""
    a, e = actual.reshape(-1), expected.reshape(-1)
    assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, e.dtype, a.shape, e.shape)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    assert torch.equal(a_nan, e_nan), f"NaN at different positions: {a_nan.nonzero()} vs {e_nan.nonzero()}"
    keep = ~a_nan
    diff = (bits_of(a[keep]) != bits_of(e[keep])).nonzero()
    assert diff.numel() == 0, f"first differing bytes at {diff[:8].reshape(-1).tolist()}: {a[keep]} vs {e[keep]}"

"""Pure-numpy reference of pycomm's Philox4x32-10 and quantized byte format.

Written from the format specification (csrc/include/pycomm/quant_format.h),
independently of the kernels, so that tests compare the kernels' bytes with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
STREAM_STOCHASTIC_ROUNDING = 0x51554E54
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key0: int, key1: int) -> np.ndarray:
    """counter: uint32 [N, 4]; returns uint32 [N, 4]."""
    c = counter.astype(np.uint64)
    k0, k1 = np.uint64(key0), np.uint64(key1)
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(W0)) & MASK32
            k1 = (k1 + np.uint64(W1)) & MASK32
        p0 = M0 * c[:, 0]
        p1 = M1 * c[:, 2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = np.stack([hi1 ^ c[:, 1] ^ k0, lo1, hi0 ^ c[:, 3] ^ k1, lo0], axis=1)
    return c.astype(np.uint32)


def uniforms(seed: int, count: int, stream: int = STREAM_STOCHASTIC_ROUNDING, first: int = 0) -> np.ndarray:
    """float32 uniforms of stream indices first..first+count-1 (first and count multiples of 4)."""
    seed &= (1 << 64) - 1
    blocks = np.arange(first // 4, (first + count) // 4, dtype=np.uint64)
    counter = np.stack([blocks & MASK32, blocks >> np.uint64(32), np.full_like(blocks, stream),
                        np.zeros_like(blocks)], axis=1).astype(np.uint32)
    words = philox4x32_10(counter, seed & 0xFFFFFFFF, seed >> 32).reshape(-1)
    return (words >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def quantize_reference(x: torch.Tensor, bits: int, bucket_size: int, stochastic: bool, seed: int,
                       first_bucket: int = 0, stream_start: int | None = None) -> np.ndarray:
    """The payload bytes, uint8 [num_buckets, 8 + bucket_size * bits / 8] (identity layout), for
    buckets that sit at positions first_bucket, first_bucket + 1, ... of the payload (this picks
    their stochastic-rounding stream: bucket i draws Philox indices (first_bucket + i) * bucket_size + j).
    stream_start (a multiple of 8): bucket i draws stream_start + i * bucket_size + j instead, as the
    op's row_streams gives."""
    v = x.reshape(-1).float().numpy()
    n = v.size
    nb = -(-n // bucket_size)
    max_level = np.float32(2 ** bits - 1)
    padded = np.zeros(nb * bucket_size, dtype=np.float32)
    padded[:n] = v
    valid = np.zeros(nb * bucket_size, dtype=bool)
    valid[:n] = True
    padded = padded.reshape(nb, bucket_size)
    valid = valid.reshape(nb, bucket_size)
    mn = np.where(valid, padded, np.inf).min(axis=1).astype(np.float32)
    mx = np.where(valid, padded, -np.inf).max(axis=1).astype(np.float32)
    mn, mx = mn + np.float32(0), mx + np.float32(0)  # -0 -> +0, as the format specifies
    flt_max = np.float32(3.402823466e38)
    half = np.float32(0.5)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        unit = ((mx - mn) / max_level).astype(np.float32)
        # Wide buckets (quant_format.h): a range beyond float32 gets the unit
        # max/L - min/L (FLT_MAX at 1 bit) ...
        over = ~(unit <= flt_max)
        unit[over] = flt_max if bits == 1 else (mx[over] / max_level - mn[over] / max_level)
        unit = unit.astype(np.float32)

        def is_wide(u):
            return (np.abs(u) <= flt_max) & ~(max_level * np.abs(u) <= flt_max)

        def decode_top(u, wide):
            h = max_level * (u * half)
            return np.where(wide, (mn + h) + h, mn + max_level * u).astype(np.float32)

        # ... and every unit is lowered ulp by ulp until the top level decodes finite.
        wide = is_wide(unit)
        for _ in range(64):
            top = decode_top(unit, wide)
            bad = ~((top <= flt_max) & (top >= -flt_max)) & (unit > 0)
            if not bad.any():
                break
            unit[bad] = np.nextafter(unit[bad], np.float32(0))
            wide = is_wide(unit)
        inv = np.where(unit > 0, np.float32(1.0) / np.where(unit > 0, unit, 1), np.float32(0)).astype(np.float32)
        inv = np.where(wide, np.float32(1.0) / (unit * half), inv).astype(np.float32)
    start = first_bucket * bucket_size if stream_start is None else stream_start
    r = (uniforms(seed, nb * bucket_size, first=start).reshape(nb, bucket_size)
         if stochastic
         else np.full((nb, bucket_size), 0.5, dtype=np.float32))
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.where(wide[:, None], padded * half - mn[:, None] * half, padded - mn[:, None]).astype(np.float32)
        t = (diff * inv[:, None]).astype(np.float32) + r
    t = np.clip(t, 0, max_level)
    levels = np.where(valid, t.astype(np.uint32), 0).astype(np.uint64)
    groups = levels.reshape(nb, bucket_size // 8, 8)
    words = np.zeros((nb, bucket_size // 8), dtype=np.uint64)
    for j in range(8):
        words |= groups[:, :, j] << np.uint64(j * bits)
    packed = np.stack([(words >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(bits)], axis=2)
    packed = packed.astype(np.uint8).reshape(nb, -1)
    header = np.stack([mn, unit], axis=1).astype("<f4").view(np.uint8).reshape(nb, 8)
    return np.concatenate([header, packed], axis=1)


def mixed_reference(x: torch.Tensor, table: torch.Tensor, bucket_size: int, stochastic: bool,
                    seed: int) -> np.ndarray:
    """The flat payload of a mixed (offset, length, bits, byte_offset) table: row k's record is the
    record of elements [offset, offset + length) of x with the row's bits, at payload position k
    (an empty row is an all-zero record), concatenated in row order."""
    flat = x.reshape(-1)
    records = []
    for k, (offset, length, bits, _) in enumerate(table.tolist()):
        if length == 0:
            records.append(np.zeros(8 + bucket_size * bits // 8, dtype=np.uint8))
        else:
            records.append(quantize_reference(flat[offset:offset + length], bits, bucket_size, stochastic, seed,
                                              first_bucket=k).reshape(-1))
    return np.concatenate(records) if records else np.zeros(0, dtype=np.uint8)


def bucket_units(x64: torch.Tensor, bits: int, bucket_size: int) -> torch.Tensor:
    """Per-element unit (max - min) / (2^bits - 1) of the element's bucket, in float64."""
    n = x64.numel()
    nb = -(-n // bucket_size)
    pad = torch.full((nb * bucket_size,), float("nan"), dtype=torch.float64)
    pad[:n] = x64
    pad = pad.view(nb, bucket_size)
    rng = (torch.nan_to_num(pad, nan=-math.inf).amax(1) - torch.nan_to_num(pad, nan=math.inf).amin(1))
    return (rng / (2**bits - 1)).repeat_interleave(bucket_size)[:n]

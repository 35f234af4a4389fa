"""Argument checks and constants shared by the op families (mirrors of the C++ rules)."""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_DTYPES", "HEADER_BYTES", "MAX_BUCKET_SIZE"]

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

"""Argument checks and constants shared by the op families and their callers (distributed, hooks).

They mirror the C++ rules of csrc/*_checks.h so that Python callers get a ``ValueError`` before any
work; tests/ops/test_validation.py checks that both sides accept and refuse the same values."""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_DTYPES", "HEADER_BYTES", "MAX_BUCKET_SIZE", "is_int", "check_bits_bucket", "check_float_tensor"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEADER_BYTES = 8
MAX_BUCKET_SIZE = 1 << 24


def is_int(value: object) -> bool:
    """An int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_bits_bucket(bits: int, bucket_size: int) -> None:
    """``ValueError`` unless bits is an int in [1, 8] and bucket_size a positive multiple of 8, at most 2^24."""
    if not is_int(bits) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    if not is_int(bucket_size) or bucket_size < 8 or bucket_size % 8 or bucket_size > MAX_BUCKET_SIZE:
        raise ValueError(f"bucket_size must be a positive multiple of 8 and at most 2^24, got {bucket_size!r}")


def check_float_tensor(x: torch.Tensor, name: str) -> None:
    """``ValueError`` unless ``x`` is a float32, float16 or bfloat16 tensor (``name`` is used in the message)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")

"""Deep Gradient Compression: top-k selection by magnitude, densify, momentum correction and masking.

Each op's fake kernel (shape propagation for torch.compile and meta tensors) follows its wrapper.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pycomm import _C  # noqa: F401  (loads the library that registers torch.ops.pycomm)
from pycomm.ops.validation import check_float_tensor

__all__ = ["topk_count", "topk", "densify", "dgc_compensate", "dgc_mask"]


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
    check_float_tensor(x, "x")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
    return torch.ops.pycomm.topk_magnitude(x.reshape(-1), segments, float(density), bool(exact),
                                           float(sample_ratio), int(seed), host_segments)


@torch.library.register_fake("pycomm::topk_magnitude")
def _topk_magnitude_fake(x, segments, density, exact, sample_ratio, seed, host_segments=None):
    if segments is None:
        total = topk_count(x.numel(), density)
    else:  # data-dependent on the table's contents
        total = torch.library.get_ctx().new_dynamic_size()
    index_dtype = torch.int32 if x.numel() <= 2**31 - 1 else torch.int64
    return x.new_empty((total,)), x.new_empty((total,), dtype=index_dtype)


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
    check_float_tensor(values, "values")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have the same shape")
    if isinstance(numel, bool):
        raise ValueError(f"numel must be an int, got {numel!r}")
    _check_first_bad(first_bad, values)
    return torch.ops.pycomm.densify(values, indices, int(numel), first_bad)


@torch.library.register_fake("pycomm::densify")
def _densify_fake(values, indices, numel, first_bad=None):
    return values.new_empty((numel,), dtype=torch.float32)


def dgc_compensate(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, momentum: float, nesterov: bool = False,
                   clip_norm: float = 0.0, segments: Optional[torch.Tensor] = None) -> None:
    """DGC momentum correction in place: ``u = m*u + g; v += u`` (Nesterov: ``u = m*(u + g); v += u + g``).

    ``u`` and ``v`` are float32 with as many elements as ``grad``. With ``clip_norm > 0`` each
    segment's gradient is first scaled to L2 norm at most ``clip_norm``.
    """
    check_float_tensor(grad, "grad")
    torch.ops.pycomm.dgc_compensate(grad.reshape(-1), u, v, segments, float(momentum), bool(nesterov),
                                    float(clip_norm))


@torch.library.register_fake("pycomm::dgc_compensate")
def _dgc_compensate_fake(grad, u, v, segments, momentum, nesterov, clip_norm):
    return None


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


@torch.library.register_fake("pycomm::dgc_mask")
def _dgc_mask_fake(v, u, indices, first_bad=None):
    return None

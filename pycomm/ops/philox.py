"""Philox variates: counter-based Gaussian / Rademacher noise (issue 4).

Zeroth-order (SPSA / MeZO) training regenerates its perturbation z from a seed
instead of storing it. These ops compute z on the fly from Philox4x32-10: the
variate of an element depends only on (seed, global element index), where the
global index of element j of tensor i in a list is
``offset + sum(numel of tensors before i) + j``. The results are therefore
the same on CPU and CUDA, for any thread count or launch configuration, and
however the parameters are split into tensors. Definitions (Box-Muller on
Philox words with device-independent log / sin / cos / sqrt, one bit per
Rademacher sign, the summation order of ``philox_dot``):
``csrc/include/pycomm/philox_variates.h``.

Each op's fake kernel follows its wrapper.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from pycomm import _C  # noqa: F401  (loads the library that registers torch.ops.pycomm)
from pycomm.ops.validation import SUPPORTED_DTYPES, check_float_tensor

__all__ = [
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


def philox_distribution_code(distribution: str) -> int:
    """The kernels' code of a distribution name (``ValueError`` for an unknown one)."""
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
        check_float_tensor(t, f"tensors[{i}]")
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


@torch.library.register_fake("pycomm::philox_variates")
def _philox_variates_fake(like, n, seed, offset, distribution):
    return like.new_empty((n,))


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
    dist = philox_distribution_code(distribution)
    offset = _philox_count(offset, "offset")
    ts = _philox_tensors(tensors, offset, in_place=True)
    if ts:  # the op raises on a leaf that requires grad and bumps the versions (csrc/ops.cpp)
        torch.ops.pycomm.philox_axpy_(ts, _philox_seed(seed), _philox_alpha(alpha), dist, offset)


@torch.library.register_fake("pycomm::philox_axpy_")
def _philox_axpy_fake(tensors, seed, alpha, distribution, offset):
    return None


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
    dist = philox_distribution_code(distribution)
    offset = _philox_count(offset, "offset")
    seeds = _philox_seeds(seeds)
    ts = _philox_tensors(tensors, offset, in_place=True)
    device = ts[0].device if ts else torch.device("cpu")
    alphas = _philox_alphas(alphas, len(seeds), device)
    if ts and seeds:
        torch.ops.pycomm.philox_axpy_multi_(ts, seeds, alphas, dist, offset)


@torch.library.register_fake("pycomm::philox_axpy_multi_")
def _philox_axpy_multi_fake(tensors, seeds, alphas, distribution, offset):
    return None


def philox_perturbed_copy(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seed: int, alpha: float,
                          distribution: str = "gaussian", offset: int = 0) -> list[torch.Tensor]:
    """Out of place: new contiguous tensors ``t + alpha * z``, exactly what :func:`philox_axpy_` would write.

    Inputs may be non-contiguous (their elements are numbered in row-major order).
    Returns a list with one tensor per input, same shapes and dtypes.
    """
    dist = philox_distribution_code(distribution)
    offset = _philox_count(offset, "offset")
    ts = _philox_tensors(tensors, offset, in_place=False)
    if not ts:
        return []
    return list(torch.ops.pycomm.philox_perturbed_copy(ts, _philox_seed(seed), _philox_alpha(alpha), dist, offset))


@torch.library.register_fake("pycomm::philox_perturbed_copy")
def _philox_perturbed_copy_fake(tensors, seed, alpha, distribution, offset):
    return [t.new_empty(t.shape) for t in tensors]


def philox_dot(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seed: int, distribution: str = "gaussian",
               offset: int = 0) -> float:
    """``<t, z>`` over all tensors (numbered as in :func:`philox_axpy_`), as a Python float.

    Each product ``double(t_i) * double(z_i)`` is exact; the products are summed in double in a
    fixed order (chunks of 4096 global indices, 32 interleaved lanes per chunk, halving trees;
    see ``philox_variates.h``), so CPU and CUDA return the same double bit for bit, for any
    tensor split. On CUDA this synchronizes (``.item()``); :func:`philox_dot_multi` returns the
    float64 device tensor without waiting.
    """
    dist = philox_distribution_code(distribution)
    offset = _philox_count(offset, "offset")
    ts = _philox_tensors(tensors, offset, in_place=False)
    if not ts:
        return 0.0
    return torch.ops.pycomm.philox_dot(ts, _philox_seed(seed), dist, offset).item()


@torch.library.register_fake("pycomm::philox_dot")
def _philox_dot_fake(tensors, seed, distribution, offset):
    return tensors[0].new_empty((), dtype=torch.float64)


def philox_dot_multi(tensors: Union[torch.Tensor, Sequence[torch.Tensor]], seeds: Sequence[int],
                     distribution: str = "gaussian", offset: int = 0) -> torch.Tensor:
    """``<t, z(seeds[k])>`` for every seed, as a float64 tensor of shape ``[K]`` on the tensors' device.

    Element k equals ``philox_dot(tensors, seeds[k], distribution, offset)`` bit for bit (same
    summation order). The tensors are read once for all K directions on the CPU; on CUDA one
    launch covers up to 32 directions and nothing waits for the device (no ``.item()``).
    An empty tensor list gives K zeros on the CPU.
    """
    dist = philox_distribution_code(distribution)
    offset = _philox_count(offset, "offset")
    seeds = _philox_seeds(seeds)
    ts = _philox_tensors(tensors, offset, in_place=False)
    if not ts:
        return torch.zeros(len(seeds), dtype=torch.float64)
    return torch.ops.pycomm.philox_dot_multi(ts, seeds, dist, offset)


@torch.library.register_fake("pycomm::philox_dot_multi")
def _philox_dot_multi_fake(tensors, seeds, distribution, offset):
    return tensors[0].new_empty((len(seeds),), dtype=torch.float64)

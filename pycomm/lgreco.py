"""L-GreCo's per-layer choice of compression parameters (Markov et al., MLSys 2024).

Given, for ``L`` layers and ``C`` candidate settings each, the compression error
``errors[l][c]`` and the compressed size ``sizes[l][c]``, :func:`solve` picks one
candidate per layer so that the total size is least while the total error stays
within ``budget`` (L-GreCo takes the total error of the uniform default setting).
It is a dynamic program over the budget cut into ``levels`` steps, O(L * C * levels),
exactly optimal for the discretized problem (C++ kernel
``torch.ops.pycomm.lgreco_solve``; 1,000 layers x 8 candidates x 10,000 levels
take a few tens of milliseconds on one CPU core).

Example::

    import pycomm
    errors = [[0.0, 1.0, 3.0], [0.5, 2.0, 4.0]]        # error falls as the size grows
    sizes = [[30, 20, 10], [60, 40, 20]]
    sol = pycomm.lgreco.solve(errors, sizes, budget=4.5)
    print(sol)   # Solution(choice=[0, 2], size=50.0, error=4.0, feasible=True)
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pycomm.ops.lgreco_solver import lgreco_solve

__all__ = ["Solution", "solve", "MAX_LEVELS", "MAX_CANDIDATES", "MAX_BACK_POINTER_BYTES"]

log = logging.getLogger(__name__)

MAX_LEVELS = 10_000_000
MAX_CANDIDATES = 256
MAX_BACK_POINTER_BYTES = 1 << 30


@dataclass(frozen=True)
class Solution:
    """The solver's answer.

    Attributes:
        choice: the chosen candidate (column) index per layer.
        size: total size of the choice, ``sizes`` summed in layer order in float64
            (the DP's own sum).
        error: total true (undiscretized) error of the choice, ``math.fsum`` of the
            chosen errors (correctly rounded; ``math.inf`` when the exact total exceeds the
            largest float64, e.g. finite errors near 1e308). With ``feasible`` it is ``<= budget``.
        feasible: False when no combination fits the budget; ``choice`` is then the
            least-error fallback (see :func:`solve`).
    """

    choice: list[int]
    size: float
    error: float
    feasible: bool


def _as_table(data: Any, name: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        t = data.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.from_numpy(np.array(data, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be an L x C table of numbers (nested lists, numpy array or tensor): "
                             f"{exc}") from None
    if t.dim() == 1 and t.numel() == 0:
        t = t.reshape(0, 0)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [layers, candidates], got shape {tuple(t.shape)}")
    return t.contiguous()


def solve(errors: Any, sizes: Any, budget: float, levels: int = 10000) -> Solution:
    """The candidate per layer of least total size whose total error fits ``budget``.

    Args:
        errors: ``L x C`` table (nested lists, numpy array or tensor; read as float64),
            ``errors[l][c] >= 0``. NaN or +-Inf marks a candidate as unavailable: it is
            never chosen (pad layers with fewer candidates this way). Every layer needs
            at least one finite error.
        sizes: ``L x C`` table of finite sizes ``> 0`` (e.g. bytes or elements sent).
        budget: total error allowed, ``>= 0``; ``math.inf`` allows everything.
        levels: steps the budget is cut into, ``1 <= levels <= MAX_LEVELS``, with
            ``L * (levels + 1) <= MAX_BACK_POINTER_BYTES`` (one back-pointer byte per
            layer and level). More levels: closer to the continuous optimum, slower.

    Discretization: ``unit = budget / levels`` (lowered by rounding so that
    ``levels * unit <= budget`` exactly) and ``level(err) = ceil(err / unit)``, the
    least integer ``k`` with ``k * unit >= err`` exactly; an exactly-zero error has
    level 0. Rounding up means any choice whose levels sum to at most ``levels``
    has a true error ``<= budget``; the price is up to one level per layer, so a
    choice whose true error is at (or just under) the budget may not fit: L-GreCo's
    uniform default column fits its own error as budget only if the rounding leaves
    room. A candidate whose error alone exceeds the budget is excluded (not clipped
    to the top level). The DP is exact for the discretized problem.

    Tie-breaking (deterministic: every rank that solves the same table gets the
    same answer; no dependence on the thread count or the CPU's vector width):
    least total size, then least total discretized error, then the lowest candidate
    index on the last layer, then on the one before, and so on. Sizes are summed in
    float64 in layer order; with integer-valued sizes (byte or element counts) the
    sums are exact and the rule holds exactly.

    Special budgets: ``budget = inf`` takes per layer the smallest size (ties: the
    smaller error, then the lower index). When no combination fits (e.g. budget 0
    and nonzero errors), the fallback is the least-error candidate per layer (ties:
    the smaller size, then the lower index), ``feasible=False`` and a warning on the
    ``pycomm.lgreco`` logger.

    Raises:
        ValueError: shapes that differ or are not 2-D, more than ``MAX_CANDIDATES``
            candidates, a negative finite error, a size that is not finite and > 0,
            a layer whose errors are all NaN/Inf, a NaN or negative budget, or
            ``levels`` out of range.
    """
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise ValueError(f"levels must be an integer, got {levels!r}")
    levels = int(levels)
    if not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be in [1, {MAX_LEVELS}], got {levels}")
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a number, got {budget!r}")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {budget!r}") from None
    if math.isnan(budget) or budget < 0:
        raise ValueError(f"budget must be >= 0 (or math.inf), got {budget}")
    err = _as_table(errors, "errors")
    size = _as_table(sizes, "sizes")
    if err.shape != size.shape:
        raise ValueError(f"errors and sizes must have the same shape, got {tuple(err.shape)} and "
                         f"{tuple(size.shape)}")
    num_layers = err.shape[0]
    if not math.isinf(budget) and num_layers * (levels + 1) > MAX_BACK_POINTER_BYTES:
        raise ValueError(f"layers * (levels + 1) = {num_layers} * {levels + 1} back-pointer bytes exceeds "
                         f"MAX_BACK_POINTER_BYTES = {MAX_BACK_POINTER_BYTES}; use fewer levels")
    # The op checks the table's values (ValueError naming the offending entry).
    choice_t, feasible_t = lgreco_solve(err, size, budget, levels)
    choice = choice_t.tolist()
    rows = torch.arange(num_layers)
    total_size = 0.0
    for s in size[rows, choice_t].tolist():  # layer order, as the DP adds
        total_size += s
    try:
        total_error = math.fsum(err[rows, choice_t].tolist())
    except OverflowError:
        # The chosen errors are finite and >= 0, so fsum overflows only when their exact total
        # exceeds the largest float64: its correctly rounded value is +inf.
        total_error = math.inf
    feasible = bool(feasible_t)
    if not feasible:
        log.warning("lgreco.solve: no choice of candidates fits the error budget %r (%d levels); falling back to "
                    "the least-error candidate per layer (total error %r)", budget, levels, total_error)
    return Solution(choice=choice, size=total_size, error=total_error, feasible=feasible)

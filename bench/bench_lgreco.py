"""L-GreCo solver benchmark: 1,000 layers x 8 candidates x 10,000 levels (CPU).

Group ``lgreco_solve-cpu``: ``pycomm.lgreco.solve`` (the whole Python call: conversion,
C++ DP, totals) and the same DP written in torch ops (one shifted add, compare and
a ``torch.where`` and a ``masked_fill_`` per candidate and layer over all levels at
once, uint8 back-pointers), measured in the same run; the torch benchmark first checks
that both give the same choice. ``make bench`` prints the ratio (bench/ratios.py: ``_pycomm`` / ``_torch``).
"""

import math

import numpy as np
import pytest
import torch

import pycomm

LAYERS, CANDIDATES, LEVELS = 1000, 8, 10_000


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    sizes = np.sort(rng.integers(1_000, 1_000_000, (LAYERS, CANDIDATES)), axis=1).astype(np.float64)
    errors = rng.uniform(0.5, 2.0, (LAYERS, 1)) / np.sqrt(sizes) * rng.uniform(0.8, 1.2, (LAYERS, CANDIDATES))
    budget = float(errors[:, CANDIDATES // 2].sum()) * 1.1
    return torch.from_numpy(errors), torch.from_numpy(sizes), budget


def torch_solve(errors: torch.Tensor, sizes: torch.Tensor, budget: float, levels: int) -> list[int]:
    """The DP in torch ops, same discretization (up to the exact-rounding fix-ups) and tie-breaking."""
    unit = budget / levels
    lv = torch.where(errors == 0, 0.0, torch.ceil(errors / unit))
    usable = torch.isfinite(lv) & (lv <= levels)
    lv = torch.where(usable, lv, 0.0).to(torch.int64)
    lv_rows, usable_rows, size_rows = lv.tolist(), usable.tolist(), sizes.tolist()
    width = levels + 1
    prev = torch.full((width,), math.inf, dtype=torch.float64)
    prev[0] = 0.0
    back = torch.zeros((len(lv_rows), width), dtype=torch.uint8)
    shifted = torch.empty(width, dtype=torch.float64)
    for l, (lv_row, ok_row, size_row) in enumerate(zip(lv_rows, usable_rows, size_rows)):
        cur = torch.full((width,), math.inf, dtype=torch.float64)
        arg = back[l]
        for c in range(len(lv_row)):
            if not ok_row[c]:
                continue
            k = lv_row[c]
            shifted[:k] = math.inf
            torch.add(prev[:width - k], size_row[c], out=shifted[k:])
            better = shifted < cur
            torch.where(better, shifted, cur, out=cur)
            arg.masked_fill_(better, c)
        prev = cur
    e = int(torch.argmin(prev))  # first minimum: the least level
    if not math.isfinite(prev[e]):
        raise ValueError("infeasible")
    choice = [0] * len(lv_rows)
    for l in range(len(lv_rows) - 1, -1, -1):
        choice[l] = int(back[l, e])
        e -= lv_rows[l][choice[l]]
    return choice


def test_lgreco_solve_pycomm(benchmark, table):
    errors, sizes, budget = table
    benchmark.group = "lgreco_solve-cpu"
    benchmark.pedantic(lambda: pycomm.lgreco.solve(errors, sizes, budget, LEVELS), rounds=20, iterations=1,
                       warmup_rounds=2)


def test_lgreco_solve_torch(benchmark, table):
    errors, sizes, budget = table
    benchmark.group = "lgreco_solve-cpu"
    assert torch_solve(errors, sizes, budget, LEVELS) == pycomm.lgreco.solve(errors, sizes, budget, LEVELS).choice
    benchmark.pedantic(lambda: torch_solve(errors, sizes, budget, LEVELS), rounds=3, iterations=1, warmup_rounds=1)

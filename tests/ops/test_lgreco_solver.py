"""L-GreCo solver (pycomm.lgreco.solve, torch.ops.pycomm.lgreco_solve): optimality against brute force,
the budget kept in true error, the documented tie-breaking, fallbacks and validation."""

import itertools
import logging
import math
import random

import numpy as np
import pytest
import torch

import pycomm
from pycomm.lgreco import Solution, solve


def discretize(errors, budget, levels):
    """Reference discretization, in exact rational arithmetic: the same unit and levels as the kernel."""
    from fractions import Fraction

    unit = budget / levels
    while unit > 0 and Fraction(unit) * levels > Fraction(budget):
        unit = math.nextafter(unit, 0.0)
    table = []
    for row in errors:
        out = []
        for e in row:
            if not math.isfinite(e):
                out.append(None)
            elif e == 0:
                out.append(0)
            elif unit == 0:
                out.append(None)
            else:
                k = math.ceil(Fraction(e) / Fraction(unit))
                out.append(k if k <= levels else None)
        table.append(out)
    return table


def layer_sum(values):
    total = 0.0
    for v in values:
        total += v
    return total


def brute_force(errors, sizes, budget, levels):
    """Best choice by the documented order: (size, discretized error, reversed choice), or None."""
    lv = discretize(errors, budget, levels)
    best = None
    for choice in itertools.product(*[range(len(row)) for row in errors]):
        ks = [lv[l][c] for l, c in enumerate(choice)]
        if any(k is None for k in ks) or sum(ks) > levels:
            continue
        key = (layer_sum(sizes[l][c] for l, c in enumerate(choice)), sum(ks), choice[::-1])
        if best is None or key < best[0]:
            best = (key, list(choice))
    return None if best is None else best[1]


def random_instance(rng, num_layers, num_cands, integer_sizes):
    errors, sizes = [], []
    for _ in range(num_layers):
        # Few distinct values so that ties in size and in error are common.
        errors.append([rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, rng.uniform(0, 3)]) for _ in range(num_cands)])
        if integer_sizes:
            sizes.append([float(rng.randint(1, 6)) for _ in range(num_cands)])
        else:
            sizes.append([rng.uniform(0.1, 5.0) for _ in range(num_cands)])
    return errors, sizes


@pytest.mark.parametrize("integer_sizes", [True, False])
def test_optimal_against_brute_force(integer_sizes):
    rng = random.Random(1234 + integer_sizes)
    checked_feasible = 0
    for trial in range(400):
        num_layers, num_cands = rng.randint(1, 6), rng.randint(1, 4)
        errors, sizes = random_instance(rng, num_layers, num_cands, integer_sizes)
        least = sum(min(row) for row in errors)
        budget = rng.choice([0.0, least, least * rng.uniform(0.8, 3.0), rng.uniform(0, 10)])
        levels = rng.choice([1, 3, 10, 97, 10000])
        sol = solve(errors, sizes, budget, levels)
        expected = brute_force(errors, sizes, budget, levels)
        if expected is None:
            assert not sol.feasible
            continue
        checked_feasible += 1
        assert sol.feasible
        exact_size = layer_sum(sizes[l][c] for l, c in enumerate(expected))
        assert sol.size == exact_size  # the least size, bit for bit
        if integer_sizes:
            assert sol.choice == expected, (trial, errors, sizes, budget, levels)  # tie-breaking, exactly
        assert sol.error == math.fsum(errors[l][c] for l, c in enumerate(sol.choice))
        assert sol.error <= budget
    assert checked_feasible > 120


def test_never_exceeds_budget_in_true_error():
    # Errors and budgets chosen so that err / unit rounds down to an integer in float64.
    rng = random.Random(7)
    for _ in range(300):
        num_layers = rng.randint(1, 40)
        levels = rng.choice([1, 7, 10, 1000, 10000])
        budget = rng.uniform(0.01, 5.0)
        unit = budget / levels
        errors = [[unit * rng.randint(0, levels // 4 + 1) * (1 + rng.choice([0, 1e-16, 2e-16, -1e-16]))
                   for _ in range(3)] for _ in range(num_layers)]
        sizes = [[float(rng.randint(1, 9)) for _ in range(3)] for _ in range(num_layers)]
        sol = solve(errors, sizes, budget, levels)
        if sol.feasible:
            assert math.fsum(errors[l][c] for l, c in enumerate(sol.choice)) <= budget


def test_error_exactly_at_budget():
    errors, sizes = [[0.0, 1.0, 3.0], [0.5, 2.0, 4.0]], [[30, 20, 10], [60, 40, 20]]
    # unit = 4 / 1024 is exact: 4.0 is exactly 1024 levels and fits.
    assert solve(errors, sizes, budget=4.0, levels=1024) == Solution([0, 2], 50.0, 4.0, True)
    # unit = 4 / 10000 is not: the unit is lowered so that 10000 units <= 4, and 4.0 then needs
    # 10001 levels. Rounding up errs on the safe side: the next best choice.
    assert solve(errors, sizes, budget=4.0, levels=10000) == Solution([1, 1], 60.0, 3.0, True)


def test_over_budget_candidate_is_excluded_not_clipped():
    # Candidate 1 of layer 0 alone has 5x the budget. Clipped to the top level (the reference's
    # defect) it would look like it costs the whole budget and win with layer 1's zero-error option:
    # size 1 + 10 = 11 < 50 + 10, at a true error of 5.0 > budget 1.0.
    errors = [[0.5, 5.0], [0.0, 0.5]]
    sizes = [[50.0, 1.0], [10.0, 5.0]]
    clipped = [[min(math.ceil(e / (1.0 / 128)), 128) for e in row] for row in errors]
    clipped_best = min(itertools.product(range(2), range(2)),
                       key=lambda ch: (sum(sizes[l][c] for l, c in enumerate(ch))
                                       if sum(clipped[l][c] for l, c in enumerate(ch)) <= 128 else math.inf))
    assert clipped_best == (1, 0)  # what clipping would choose: true error 5.0
    sol = solve(errors, sizes, budget=1.0, levels=128)
    assert sol.feasible and sol.choice == [0, 1] and sol.size == 55.0 and sol.error == 1.0


def test_zero_error_takes_level_zero():
    # Budget 0: only exactly-zero errors fit; the smallest of them wins.
    sol = solve([[0.0, 0.0, 1e-300], [0.0, 2.0, 0.0]], [[5.0, 4.0, 1.0], [3.0, 1.0, 2.0]], budget=0.0)
    assert sol == Solution(choice=[1, 2], size=6.0, error=0.0, feasible=True)


def test_degenerate_shapes():
    assert solve([[2.0]], [[7.0]], 5.0) == Solution([0], 7.0, 2.0, True)  # one layer, one candidate
    assert solve([[2.0, 1.0, 0.5]], [[1.0, 2.0, 3.0]], 1.2).choice == [1]  # one layer
    assert solve([[1.0], [2.0], [3.0]], [[1.0], [1.0], [1.0]], 6.5) == Solution([0, 0, 0], 3.0, 6.0, True)
    zeros = solve(np.zeros((4, 3)), np.array([[3.0, 1.0, 2.0]] * 4), 0.0)
    assert zeros == Solution([1, 1, 1, 1], 4.0, 0.0, True)
    assert solve([], [], 1.0) == Solution([], 0.0, 0.0, True)
    assert solve(torch.empty(0, 3), torch.empty(0, 3), 1.0) == Solution([], 0.0, 0.0, True)


def test_budget_inf_takes_smallest_size():
    errors = [[9.0, 1.0, 5.0, math.nan], [1e300, 2.0, 3.0, 0.0]]
    sizes = [[1.0, 1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 4.0]]
    # Layer 0: the NaN candidate is unavailable; sizes tie at 1.0, the smaller error wins.
    # Layer 1: three sizes tie at 1.0; of their errors (1e300, 2, 3) 2.0 is the least.
    sol = solve(errors, sizes, math.inf)
    assert sol == Solution([1, 1], 2.0, 3.0, True)


def test_infeasible_falls_back_to_least_error(caplog):
    errors = [[3.0, 2.0, 2.0, 4.0], [1.0, math.inf, 5.0, 1.0]]
    sizes = [[1.0, 3.0, 2.0, 1.0], [4.0, 0.1, 1.0, 4.0]]
    with caplog.at_level(logging.WARNING, logger="pycomm.lgreco"):
        sol = solve(errors, sizes, budget=2.5)
    # Layer 0: errors tie at 2.0, the smaller size (index 2); layer 1: errors and sizes tie, index 0.
    assert sol == Solution([2, 0], 6.0, 3.0, False)
    assert any("falling back" in r.getMessage() for r in caplog.records)
    # A discretization-only infeasibility also falls back (true error 2 x 0.5 fits 1.0 with
    # levels=3 only if ceil(0.5 / (1/3)) = 2 per layer, 4 > 3 levels).
    sol = solve([[0.5], [0.5]], [[1.0], [1.0]], budget=1.0, levels=3)
    assert not sol.feasible and sol.choice == [0, 0]
    assert solve([[0.5], [0.5]], [[1.0], [1.0]], budget=1.0, levels=4).feasible


def test_nan_inf_errors_are_unavailable():
    errors = [[math.nan, 1.0, math.inf], [-math.inf, 0.5, 0.0]]
    sizes = [[1.0, 5.0, 1.0], [1.0, 2.0, 9.0]]
    sol = solve(errors, sizes, budget=10.0)
    assert sol == Solution([1, 1], 7.0, 1.5, True)
    with pytest.raises(ValueError, match="layer 1 has no usable candidate"):
        solve([[1.0, 2.0], [math.nan, math.inf]], [[1.0, 1.0], [1.0, 1.0]], 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(errors=[[1.0, -0.5]], sizes=[[1.0, 1.0]], budget=1.0), r"errors must be >= 0.*errors\[0\]\[1\]"),
    (dict(errors=[[1.0, 1.0]], sizes=[[1.0, 0.0]], budget=1.0), r"sizes must be finite and > 0.*sizes\[0\]\[1\]"),
    (dict(errors=[[1.0, 1.0]], sizes=[[1.0, -2.0]], budget=1.0), "sizes must be finite and > 0"),
    (dict(errors=[[1.0, 1.0]], sizes=[[math.inf, 1.0]], budget=1.0), "sizes must be finite and > 0"),
    (dict(errors=[[1.0, 1.0]], sizes=[[math.nan, 1.0]], budget=1.0), "sizes must be finite and > 0"),
    (dict(errors=[[1.0, 1.0]], sizes=[[1.0, 1.0]], budget=math.nan), "budget must be >= 0"),
    (dict(errors=[[1.0, 1.0]], sizes=[[1.0, 1.0]], budget=-1.0), "budget must be >= 0"),
    (dict(errors=[[1.0, 1.0]], sizes=[[1.0, 1.0]], budget="a"), "budget must be a number"),
    (dict(errors=[[1.0, 1.0]], sizes=[[1.0, 1.0, 1.0]], budget=1.0), "same shape"),
    (dict(errors=[[1.0, 1.0], [1.0]], sizes=[[1.0, 1.0], [1.0]], budget=1.0), "errors must be an L x C table"),
    (dict(errors=[1.0, 1.0], sizes=[1.0, 1.0], budget=1.0), "2-D"),
    (dict(errors=[[1.0]], sizes=[[1.0]], budget=1.0, levels=0), r"levels must be in \[1, "),
    (dict(errors=[[1.0]], sizes=[[1.0]], budget=1.0, levels=10**8), r"levels must be in \[1, "),
    (dict(errors=[[1.0]], sizes=[[1.0]], budget=1.0, levels=2.5), "levels must be an integer"),
    (dict(errors=[[1.0]], sizes=[[1.0]], budget=1.0, levels=True), "levels must be an integer"),
    (dict(errors=np.ones((200, 1)), sizes=np.ones((200, 1)), budget=1.0, levels=10**7), "back-pointer bytes"),
    (dict(errors=np.ones((1, 257)), sizes=np.ones((1, 257)), budget=1.0), r"candidates per layer must be in \[1, 256\]"),
    (dict(errors=np.ones((2, 0)), sizes=np.ones((2, 0)), budget=1.0), r"candidates per layer must be in \[1, 256\]"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        solve(**kwargs)


def test_inputs_lists_numpy_tensors_agree():
    rng = np.random.default_rng(3)
    errors, sizes = rng.uniform(0, 1, (30, 5)), rng.integers(1, 100, (30, 5)).astype(np.float64)
    budget = float(errors[:, 2].sum())
    a = solve(errors.tolist(), sizes.tolist(), budget)
    b = solve(errors.astype(np.float32).astype(np.float64), sizes, budget)
    c = solve(torch.from_numpy(errors), torch.from_numpy(sizes).to(torch.int32), torch.tensor(budget))
    assert a == c
    assert b.feasible and b.error <= budget
    d = solve(torch.from_numpy(errors).requires_grad_(), sizes, budget)
    assert d == a


def test_isa_levels_agree(monkeypatch):
    # The DP block is compiled for SSE2, AVX and AVX-512; the answer must not depend on which runs.
    rng = np.random.default_rng(11)
    errors = rng.uniform(0, 1, (60, 8))
    errors[rng.uniform(size=errors.shape) < 0.2] = 0.0
    sizes = rng.integers(1, 20, (60, 8)).astype(np.float64)
    budget = float(errors[:, 3].sum())
    results = []
    for isa in ["baseline", "avx", "avx512"]:
        monkeypatch.setenv("PYCOMM_LGRECO_CPU_ISA", isa)
        results.append(solve(errors, sizes, budget, levels=5000))
    assert results[0] == results[1] == results[2] and results[0].feasible


def test_thread_count_does_not_change_the_answer():
    rng = np.random.default_rng(5)
    errors, sizes = rng.uniform(0, 1, (100, 6)), rng.integers(1, 50, (100, 6)).astype(np.float64)
    budget = float(errors[:, 2].sum())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = solve(errors, sizes, budget, levels=20000)
    finally:
        torch.set_num_threads(threads)
    assert solve(errors, sizes, budget, levels=20000) == one


def numpy_dp(errors, sizes, budget, levels):
    """The same DP in numpy, vectorized over levels (independent check on larger instances)."""
    lv = discretize(errors.tolist(), budget, levels)
    prev = np.full(levels + 1, np.inf)
    prev[0] = 0.0
    back = np.zeros((len(errors), levels + 1), dtype=np.int64)
    for l in range(len(errors)):
        cur = np.full(levels + 1, np.inf)
        for c, k in enumerate(lv[l]):
            if k is None:
                continue
            cand = np.full(levels + 1, np.inf)
            cand[k:] = prev[:levels + 1 - k] + sizes[l, c]
            better = cand < cur
            cur[better], back[l, better] = cand[better], c
        prev = cur
    e = int(np.argmin(prev))
    if not math.isfinite(prev[e]):
        return None
    choice = []
    for l in range(len(errors) - 1, -1, -1):
        choice.append(int(back[l, e]))
        e -= lv[l][choice[-1]]
    return choice[::-1]


def test_matches_numpy_dp_on_medium_instances():
    rng = np.random.default_rng(17)
    for num_layers, num_cands, levels in [(40, 8, 3000), (25, 3, 10000), (60, 5, 512)]:
        errors = np.round(rng.uniform(0, 1, (num_layers, num_cands)), 2)  # coarse: many ties
        sizes = rng.integers(1, 8, (num_layers, num_cands)).astype(np.float64)
        for budget in [float(errors[:, 0].sum()), float(errors.min(1).sum()) * 1.1, 1.0]:
            expected = numpy_dp(errors, sizes, budget, levels)
            sol = solve(errors, sizes, budget, levels)
            assert sol.feasible == (expected is not None)
            if expected is not None:
                assert sol.choice == expected


def test_large_instance_sanity():
    # 1000 layers x 8 candidates, error falling as the size grows; budget: the default column's error.
    rng = np.random.default_rng(0)
    sizes = np.sort(rng.integers(1, 10**6, (1000, 8)), axis=1).astype(np.float64)
    errors = rng.uniform(0.5, 2.0, (1000, 1)) / np.sqrt(sizes) * rng.uniform(0.8, 1.2, (1000, 8))
    default = 3
    default_size = sizes[:, default].sum()
    for slack in [1.0, 1.2]:
        budget = float(errors[:, default].sum()) * slack
        sol = solve(errors, sizes, budget)
        assert sol.feasible and sol.error <= budget
        assert math.fsum(errors[np.arange(1000), sol.choice]) == sol.error
        assert sol.size < 0.95 * default_size  # real freedom in this table: a clear gain
        levels = discretize(errors[:, default:default + 1].tolist(), budget, 10000)
        default_fits = sum(row[0] for row in levels) <= 10000
        assert default_fits or slack == 1.0  # with 20% slack the rounding (<= 1 level per layer) fits
        if default_fits:
            assert sol.size <= default_size


def test_op():  # opcheck: tests/ops/test_opcheck.py
    errors = torch.tensor([[0.0, 1.0, 3.0], [0.5, 2.0, 4.0]], dtype=torch.float64)
    sizes = torch.tensor([[30.0, 20.0, 10.0], [60.0, 40.0, 20.0]], dtype=torch.float64)
    choice, feasible = torch.ops.pycomm.lgreco_solve(errors, sizes, 4.0, 1024)
    assert choice.dtype == torch.int64 and choice.tolist() == [0, 2] and feasible.dtype == torch.bool and feasible
    with pytest.raises(ValueError, match="float64"):
        torch.ops.pycomm.lgreco_solve(errors.float(), sizes.float(), 4.0, 10)


def test_exported_from_package():
    assert pycomm.lgreco.solve is solve


def test_totals_beyond_the_largest_float_are_inf_not_overflow_error():
    # Finite errors near 1e308 whose exact total exceeds DBL_MAX: fsum raised OverflowError.
    big = [[1e308, 1.5e308], [1.2e308, 1e308]]
    sizes = [[1.0, 2.0], [1.0, 2.0]]
    sol = solve(big, sizes, budget=math.inf)  # the smallest sizes, whatever their error
    assert sol == Solution([0, 0], 2.0, math.inf, True)
    sol = solve(big, sizes, budget=1e308)  # nothing fits: the least-error fallback, total inf
    assert sol.choice == [0, 1] and sol.error == math.inf and not sol.feasible
    # A total that stays finite is still summed exactly.
    sol = solve([[1e308], [7e307]], [[1.0], [1.0]], budget=math.inf)
    assert sol.error == math.fsum([1e308, 7e307]) and sol.feasible

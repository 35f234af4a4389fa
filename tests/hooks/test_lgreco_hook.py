"""The L-GreCo hook on Gloo ranks: same choice everywhere, bytes, loss against uniform, schedule, state."""

import io
import logging
import pickle

import pytest
import torch

import pycomm
from pycomm.hooks import LGreCoState
from char_task import train
from dist_utils import run_distributed

STEPS = 150
SCHEDULE = {"start_iter": 40, "period": 50, "acc_steps": 5}


def _adamw(params, dense):
    return torch.optim.AdamW(params, lr=3e-3)


def _sgd(params, dense):
    return torch.optim.SGD(params, lr=0.3, momentum=0.9 if dense else 0.0)


def _worker(rank, world, method, kwargs, steps, optimizer):
    result = train(rank, method, kwargs, steps, _adamw if optimizer == "adamw" else _sgd)
    state = result["state"]
    out = {"eval_loss": result["eval_loss"], "bytes": sum(result["bytes_by_collective"].values()),
           "params": result["params"]}
    if isinstance(state, LGreCoState):
        out.update(choice=state.choice, last_solve=state.last_solve, ratio=state.compression_ratio)
    return out


def _check_lgreco_run(runs, uniform, tolerance):
    first = runs[0]
    for r in runs[1:]:
        assert r["choice"] == first["choice"], "ranks chose differently"
        assert torch.equal(r["params"], first["params"]), "ranks diverged"
    solve = first["last_solve"]
    assert solve is not None and solve["step"] == 140 and solve["feasible"]
    assert len(first["choice"]) == solve["layers"] > 0
    # At an equal error budget the choice never sends more than uniform (uniform is feasible).
    assert solve["error"] <= solve["budget"] * (1 + 1e-12)
    assert solve["bytes"] <= solve["uniform_bytes"]
    # Bytes actually sent in the last step follow the chosen sizes (a little per-bucket padding aside).
    assert first["bytes"] <= uniform[0]["bytes"] * 1.05, (first["bytes"], uniform[0]["bytes"])
    # Stated tolerance against the uniform default at the same budget.
    assert first["eval_loss"] <= uniform[0]["eval_loss"] + tolerance, (first["eval_loss"], uniform[0]["eval_loss"])


@pytest.mark.parametrize("world, alpha", [(2, 1.0), (4, 2.0)])
def test_quant_family_trains_like_uniform(world, alpha):
    uniform = run_distributed(_worker, world, "quant", {"bits": 4}, STEPS, "adamw")
    runs = run_distributed(_worker, world, "lgreco", {"family": "quant", "default": 4, "alpha": alpha, **SCHEDULE},
                           STEPS, "adamw")
    _check_lgreco_run(runs, uniform, tolerance=0.15)
    assert set(runs[0]["choice"].values()) <= {2, 3, 4, 5, 6, 8}
    if alpha > 1:
        # A looser budget must buy fewer bytes, and the hook must really send them (mixed bits in a bucket).
        solve = runs[0]["last_solve"]
        assert solve["bytes"] < solve["uniform_bytes"]
        assert runs[0]["bytes"] < uniform[0]["bytes"] * solve["bytes"] / solve["uniform_bytes"] * 1.05


def test_topk_family_trains_like_uniform():
    options = {"momentum": 0.9, "warmup_steps": 10}
    uniform = run_distributed(_worker, 2, "dgc", {"density": 0.01, **options}, STEPS, "sgd")
    runs = run_distributed(_worker, 2, "lgreco", {"family": "topk", "default": 0.01, **options, **SCHEDULE},
                           STEPS, "sgd")
    _check_lgreco_run(runs, uniform, tolerance=0.3)


def test_schedule():
    state = LGreCoState(family="quant", start_iter=10, period=20, acc_steps=3)
    observed = [s for s in range(60) if state.observing(s)]
    solves = [s for s in range(60) if state.solves_after(s)]
    assert observed == [7, 8, 9, 27, 28, 29, 47, 48, 49]
    assert solves == [9, 29, 49]
    early = LGreCoState(family="topk", start_iter=1, period=5, acc_steps=2)
    assert [s for s in range(7) if early.observing(s)] == [4, 5]  # step 0 precedes DDP's bucket rebuild
    assert [s for s in range(7) if early.solves_after(s)] == [0, 5]


def test_bad_options():
    with pytest.raises(ValueError, match="family"):
        LGreCoState(family="powersgd")
    with pytest.raises(ValueError, match="acc_steps"):
        LGreCoState(period=5, acc_steps=6)
    with pytest.raises(ValueError, match="alpha"):
        LGreCoState(alpha=float("nan"))
    with pytest.raises(ValueError, match="bit widths"):
        LGreCoState(family="quant", candidates=(2, 9))
    with pytest.raises(ValueError, match="densities"):
        LGreCoState(family="topk", candidates=(0.0, 0.1))
    with pytest.raises(ValueError, match="bad options"):
        pycomm.register(torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel),
                        "lgreco", no_such_option=1)


def test_candidates_include_default():
    assert LGreCoState(family="quant", default=7).candidates == (2, 3, 4, 5, 6, 7, 8)
    densities = LGreCoState(family="topk", default=0.01).candidates
    assert 0.01 in densities and min(densities) == pytest.approx(0.00125) and max(densities) == pytest.approx(0.08)


_SOLVE_PARAMS = {"loud.weight": torch.zeros(64, 64), "quiet.weight": torch.zeros(994, 16),
                 "other.weight": torch.zeros(30, 100)}


def _solve_worker(rank, world):
    """Drive the state by hand: observe two buckets, solve, then check state_dict, pickling, NaN."""
    options = dict(family="quant", default=4, start_iter=1, period=1, acc_steps=1, stochastic=False)
    state = LGreCoState(**options).bind(_SOLVE_PARAMS)
    g = torch.Generator().manual_seed(rank)
    values = torch.randn(20000, generator=g)
    values[:4096] *= 100.0  # a loud layer and a quiet one
    state._observe(values, [("loud.weight", 0, 4096, 0), ("quiet.weight", 4096, 15904, 0)])
    state._observe(torch.randn(3000, generator=g), [("other.weight", 0, 3000, 0)])
    # A checkpoint inside the accumulation window keeps each layer's accumulated values by name.
    mid = state.state_dict()
    window = LGreCoState(**options).bind(_SOLVE_PARAMS)
    window.load_state_dict(mid)
    out = {"mid_shapes": {name: tuple(f["accumulated"].shape) for name, f in mid["params"].items()},
           "window_kept": all(torch.equal(window._accumulators[name], state._accumulators[name])
                              for name in state._accumulators) and window._accumulators.keys() == state._accumulators.keys()}
    try:
        LGreCoState(**options).bind({"loud.weight": torch.zeros(64, 64)}).load_state_dict(mid)
    except ValueError as e:
        out["other_model"] = str(e)
    state._solve(0)
    out.update(choice=state.choice, solve=state.last_solve)
    clone = LGreCoState(**options).bind(_SOLVE_PARAMS)
    clone.load_state_dict(state.state_dict())
    out["restored"] = clone.choice
    out["restored_solve"] = clone.last_solve
    out["pickled"] = pickle.loads(pickle.dumps(state)).choice
    state._observe(torch.full((20000,), float("nan")), [("loud.weight", 0, 4096, 0), ("quiet.weight", 4096, 15904, 0)])
    before = state.choice
    state._solve(1)
    out["after_nan"] = state.choice == before
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_solve_state_dict_and_nan(world):
    results = run_distributed(_solve_worker, world)
    first = results[0]
    assert all(r["choice"] == first["choice"] for r in results)
    assert set(first["choice"]) == {"loud.weight", "quiet.weight", "other.weight"}
    assert first["restored"] == first["choice"] == first["pickled"]
    assert first["restored_solve"] == first["solve"]
    assert first["mid_shapes"] == {"loud.weight": (64, 64), "quiet.weight": (994, 16), "other.weight": (30, 100)}
    assert first["window_kept"]
    assert "'other.weight'" in first["other_model"] or "'quiet.weight'" in first["other_model"]
    assert first["after_nan"]
    solve = first["solve"]
    assert solve["bytes"] <= solve["uniform_bytes"] and solve["error"] <= solve["budget"] * (1 + 1e-12)
    assert sum(solve["histogram"].values()) == 3
    # The loud small layer buys precision with the bytes the quiet large layer gives up.
    assert first["choice"]["loud.weight"] > 4 > first["choice"]["quiet.weight"]
    assert solve["bytes"] < solve["uniform_bytes"]

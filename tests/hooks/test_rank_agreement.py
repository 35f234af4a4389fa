"""Ranks that disagree on a hook's settings get the same clear error on every rank (no abort, no
hang); ranks that agree pay one tiny collective once and train exactly as without the check."""

import io
import re

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_distributed

# (name, setting of every rank but the last, setting of the last rank, the field the error must name)
CASES = [
    ("bits", ("quant", {"bits": 4}), ("quant", {"bits": 8}), "bits"),
    ("bucket_size", ("quant", {"bucket_size": 512}), ("quant", {"bucket_size": 256}), "bucket_size"),
    ("start_iter", ("quant", {"start_iter": 1}), ("quant", {"start_iter": 3}), "start_iter"),
    ("density", ("dgc", {"density": 0.01}), ("dgc", {"density": 0.02}), "density"),
    ("value_dtype", ("dgc", {"density": 0.01}), ("dgc", {"density": 0.01, "value_dtype": torch.float16}),
     "value_dtype"),
    ("method", ("quant", {"bits": 4}), ("dgc", {"density": 0.01}), "method"),
    ("lgreco_inner", ("lgreco", {"family": "quant", "default": 4}), ("lgreco", {"family": "quant", "default": 2}),
     "quant.bits"),
    ("projection_seed", ("spsa-projection", {"seed": 0}), ("spsa-projection", {"seed": 1}), "seed"),
]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    # A 4096-weight layer (compressed), a bias and a small layer (dense).
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def _step(model: torch.nn.Module, step: int, rank: int) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * step + rank))
    model.zero_grad()
    model(x).pow(2).sum().backward()


def _run_case(rank, world, setting_all, setting_last, steps=4):
    import pycomm

    method, kwargs = setting_last if rank == world - 1 else setting_all
    model = DDP(_net())
    pycomm.register(model, method, **kwargs)
    try:
        for step in range(steps):
            _step(model, step, rank)
    except Exception as e:  # noqa: BLE001 (the test inspects whatever came out)
        return {"type": type(e).__name__, "message": str(e), "step": step}
    return {"type": None, "message": "", "step": steps}


def _disagreement_worker(rank, world):
    results = {name: _run_case(rank, world, a, b) for name, a, b, _ in CASES}
    # A checkpoint with other per-layer bits, loaded on one rank only. (Constructor settings such as
    # bits stay the state's own: a checkpoint with other bits raises CheckpointMismatch when loaded.)
    import pycomm

    model = DDP(_net())
    state = pycomm.register(model, "quant", bits=4, start_iter=1)
    for step in range(3):
        _step(model, step, rank)
    saved = state.state_dict()
    if rank == world - 1:
        saved = {**saved, "layer_params": {"0.weight": 2}}
    state.load_state_dict(saved)
    try:
        _step(model, 3, rank)
        results["load_state_dict"] = {"type": None, "message": "", "step": 3}
    except Exception as e:  # noqa: BLE001
        results["load_state_dict"] = {"type": type(e).__name__, "message": str(e), "step": 3}
    # The process group still works after the errors: every rank reached this collective.
    ok = torch.ones(1)
    dist.all_reduce(ok)
    results["group_alive"] = ok.item() == world
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_disagreeing_ranks_raise_the_same_clear_error(world):
    results = run_distributed(_disagreement_worker, world, timeout=180)
    for rank_result in results:
        assert rank_result["group_alive"]
    expected = {name: field for name, _, _, field in CASES}
    expected["load_state_dict"] = "layer_params"
    for name, field in expected.items():
        errors = [r[name] for r in results]
        first = errors[0]
        assert first["type"] is not None, (name, "no error")
        assert all(e == first for e in errors), (name, errors)  # the same error, at the same step, on every rank
        message = first["message"]
        assert "pycomm: the %d ranks disagree" % world in message, (name, message)
        assert f"{field} (" in message, (name, message)
        assert f"rank {world - 1}:" in message and "rank 0:" in message
    quant_bits = results[0]["bits"]
    assert quant_bits["step"] == 0 and "bits (rank 0: 4, " in quant_bits["message"]
    assert len(re.findall(r"rank \d+:", quant_bits["message"])) == world  # only the differing setting is named
    assert "rank %d: 8)" % (world - 1) in quant_bits["message"]
    # Different start_iter: caught at the first hook call of step 0, before either compresses.
    assert results[0]["start_iter"]["step"] == 0
    assert "method (rank 0: 'quant', " in results[0]["method"]["message"]
    assert f"rank {world - 1}: 'dgc')" in results[0]["method"]["message"]
    assert "value_dtype (" in results[0]["value_dtype"]["message"] and "torch.float16" in \
        results[0]["value_dtype"]["message"]
    assert results[0]["load_state_dict"]["message"].count("; ") == 0  # layer_params only
    assert all(results[0][name]["type"] == "RankDisagreementError" for name in expected)


def _agreeing_worker(rank, world):
    import pycomm
    from pycomm.hooks import agreement

    calls = []
    original = dist.all_gather

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_gather = counting  # only the agreement check uses dist.all_gather
    out = {}
    for method, kwargs in [("quant", {"bits": 4, "start_iter": 1}), ("dgc", {"density": 0.01}),
                           ("spsa-projection", {"num_directions": 4}),
                           ("lgreco", {"family": "quant", "default": 4, "start_iter": 3, "period": 2,
                                       "acc_steps": 1})]:
        params = []
        for checked in (True, False):
            check = agreement.check_settings
            if not checked:
                agreement.check_settings = lambda *a, **k: None
            try:
                model = DDP(_net())
                state = pycomm.register(model, method, **kwargs)
                calls.clear()
                for step in range(8):
                    _step(model, step, rank)
                counts = [len(calls)]
                if method in ("quant", "dgc"):
                    state.set_layer_params({})
                    _step(model, 8, rank)
                    counts.append(len(calls))
                buffer = io.BytesIO()
                torch.save(state.state_dict(), buffer)
                buffer.seek(0)
                state.load_state_dict(torch.load(buffer, weights_only=True))
                _step(model, 9, rank)
                _step(model, 10, rank)
                counts.append(len(calls))
                params.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            finally:
                agreement.check_settings = check
            if checked:
                out[method] = {"counts": counts,
                               "solves": getattr(state, "last_solve", None) is not None}
        out[method]["same_as_unchecked"] = torch.equal(params[0], params[1])
    dist.all_gather = original
    return out


def test_agreeing_ranks_check_once_per_change_and_train_as_before():
    results = run_distributed(_agreeing_worker, 2, timeout=180)
    for r in results:
        # One gather at the first hook call; one after set_layer_params; one after load_state_dict.
        assert r["quant"]["counts"] == [1, 2, 3]
        assert r["dgc"]["counts"] == [1, 2, 3]
        assert r["spsa-projection"]["counts"] == [1, 2]
        # L-GreCo re-solved (steps 2, 4, 6) without a check: its solves agree by construction.
        assert r["lgreco"]["solves"] and r["lgreco"]["counts"] == [1, 2]
        for method in r:
            assert r[method]["same_as_unchecked"], method


def test_settings_are_compared_by_value():
    from pycomm.hooks.agreement import _canonical

    assert _canonical({(1, 2): 4, (0, 1): 8}) == _canonical({(0, 1): 8, (1, 2): 4})
    assert _canonical(1) == _canonical(1.0) and _canonical((0.5, 0.25)) == _canonical([0.5, 0.25])
    assert _canonical(True) != _canonical(1) and _canonical(2**60 + 1) != _canonical(2**60)
    assert _canonical(torch.float16) != _canonical(torch.float32)


def test_pickling_loading_and_layer_changes_make_the_ranks_check_again():
    import pickle

    from pycomm.hooks import DGCState, LGreCoState, ProjectionState, QuantState
    from pycomm.hooks.agreement import mark_agreed

    for state in (QuantState(), DGCState(), ProjectionState(), LGreCoState(family="topk")):
        mark_agreed(state)
        assert not getattr(pickle.loads(pickle.dumps(state)), "_settings_agreed", False)
        saved = state.state_dict()
        state.load_state_dict(saved)
        assert not state._settings_agreed
        if hasattr(state, "set_layer_params"):
            mark_agreed(state)
            state.set_layer_params({})
            assert not state._settings_agreed

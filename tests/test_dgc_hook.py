"""The DGC DDP hook on 2 and 4 Gloo ranks: equivalence with momentum SGD, convergence, bytes, state."""

import io

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_distributed
from char_task import train


def _equivalence_worker(rank, world, nesterov):
    import pycomm

    results = {}
    for mode in ("dense", "dgc"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
        model = DDP(net)
        if mode == "dgc":
            pycomm.register(model, "dgc", density=1.0, momentum=0.9, nesterov=nesterov, momentum_masking=False,
                            min_numel=1024)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov)
        for step in range(6):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step * 10 + rank))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        results[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return results


@pytest.mark.parametrize("nesterov", [False, True])
def test_density_one_equals_momentum_sgd(nesterov):
    for r in run_distributed(_equivalence_worker, 2, nesterov):
        assert torch.allclose(r["dgc"], r["dense"], atol=1e-5, rtol=1e-5), (r["dgc"] - r["dense"]).abs().max()


def _sgd(params, dense):
    # Dense: momentum in the optimizer. DGC: momentum lives in the hook.
    return torch.optim.SGD(params, lr=0.3, momentum=0.9 if dense else 0.0)


def _train_worker(rank, world, method, kwargs, steps):
    import pycomm

    result = train(rank, method, kwargs, steps, _sgd)
    state, sent = result["state"], result["bytes_by_collective"]
    expected = None
    if state is not None:  # k * (value bytes + index bytes) + a 4-byte flag per bucket, to W-1 peers
        per_bucket = [sum(pycomm.ops.topk_count(n, state.density) for _, n in plan.compressed)
                      for plan in state._plans.values() if plan.compressed]
        expected = (world - 1) * sum(k * (4 + 4) + 4 for k in per_bucket)
    return {"eval_loss": result["eval_loss"], "params": result["params"], "expected": expected,
            "gathered": sent.get("all_gather_single", 0) + sent.get("all_gather_into_tensor", 0)}


@pytest.mark.parametrize("world", [2, 4])
def test_dgc_at_0_1_percent_converges_and_sends_k_values(world):
    steps = 150
    dense = run_distributed(_train_worker, world, "allreduce", {}, steps)
    dgc = run_distributed(_train_worker, world, "dgc", {"density": 0.001, "momentum": 0.9, "warmup_steps": 10},
                          steps)
    for r in dgc[1:]:
        assert torch.equal(r["params"], dgc[0]["params"]), "ranks diverged"
    assert dense[0]["eval_loss"] < 5.545 - 2.0
    # Stated tolerance: after only 150 steps, 0.1% DGC (with the paper's warm-up) ends within 0.5 nats
    # of dense momentum SGD (measured: 2.38 vs 1.97 at W=4); both start at ln(256) = 5.55.
    assert dgc[0]["eval_loss"] <= dense[0]["eval_loss"] + 0.5, (dgc[0]["eval_loss"], dense[0]["eval_loss"])
    for r in dgc:
        assert r["gathered"] == r["expected"]


def _warmup_worker(rank, world):
    import pycomm

    state = pycomm.hooks.DGCState(density=0.001, warmup_steps=2)
    sched = [state.density_at(s) for s in range(10)]
    epochs = pycomm.hooks.DGCState(density=0.001, warmup_epochs=4, steps_per_epoch=3)
    return sched, [epochs.density_at(s) for s in range(14)]


def test_warmup_schedule():
    (sched, epochs), = run_distributed(_warmup_worker, 1)
    assert sched == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.004, 0.004, 0.001, 0.001]
    assert epochs[:3] == [0.25] * 3 and epochs[12:] == [0.001, 0.001]


def _nan_and_checkpoint_worker(rank, world):
    import pycomm

    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(256, 32))
    state = pycomm.register(model, "dgc", density=0.01, min_numel=1024)
    for step in range(3):
        model.zero_grad()
        model(torch.randn(4, 256, generator=torch.Generator().manual_seed(step + rank))).sum().backward()
    before = {k: v.clone() for k, v in state.state_dict()["buckets"][0].items() if torch.is_tensor(v)}
    # An overflow on rank 1 only.
    model.zero_grad()
    x = torch.randn(4, 256)
    if rank == 1:
        x[0, 0] = float("inf")
    model(x).sum().backward()
    grad_has_nonfinite = not bool(torch.isfinite(model.module.weight.grad).all())
    after = state.state_dict()["buckets"][0]
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    restored = pycomm.hooks.DGCState()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    return grad_has_nonfinite, before, after, restored.iter


def test_overflow_goes_uncompressed_and_state_is_per_rank():
    results = run_distributed(_nan_and_checkpoint_worker, 2)
    for rank, (nonfinite, before, after, it) in enumerate(results):
        assert nonfinite, "the overflow must reach every rank's gradients (GradScaler)"
        assert it == 4
        if rank == 1:  # the overflowing rank's accumulators are untouched
            assert torch.equal(before["u"], after["u"]) and torch.equal(before["v"], after["v"])
        assert torch.isfinite(after["u"]).all() and torch.isfinite(after["v"]).all()
    assert not torch.equal(results[0][2]["v"], results[1][2]["v"]), "each rank keeps its own accumulators"

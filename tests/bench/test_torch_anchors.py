"""PyTorch's anchors in the benchmark: PowerSGD runs at 4 Gloo ranks in its stated configuration (one DDP bucket),
and the bf16 anchor either runs or is reported unavailable for exactly the reason DDP gives."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_distributed
from pycomm.bench.config import BenchConfig
from pycomm.bench.launcher import unavailable_reason
from pycomm.bench.methods import METHODS, bf16_hook_unavailable_reason, single_bucket_cap_mb
from pycomm.bench.report import format_table

STEPS = 6  # PowerSGD compresses from step 2: four compressed steps
# 20 KB buckets: the tiny model's gradients (~100 KB) would fill several, the setting in which the hook hangs
SMALL_BUCKETS = BenchConfig(bucket_cap_mb=0.02, seed=3)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _train_anchor(rank: int, world: int, name: str, bucket_cap_mb: float | None) -> dict:
    spec = METHODS[name]
    model = _tiny_model()
    initial = [p.detach().clone() for p in model.parameters()]
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    state = spec.attach(ddp, SMALL_BUCKETS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(100 + rank)  # different data per rank: the hook must average
    for _ in range(STEPS):
        inputs = torch.randn(16, 64, generator=generator)
        loss = ddp(inputs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "initial": initial,
            "iter": state.iter, "compressed_buckets": sorted(state.p_memory_dict)}


@pytest.mark.parametrize("name", ["powersgd4"])
def test_powersgd_anchor_runs_at_four_gloo_ranks_in_one_bucket(name):
    spec = METHODS[name]
    cap = spec.ddp_bucket_cap_mb(SMALL_BUCKETS, _tiny_model())
    assert spec.single_bucket and cap == single_bucket_cap_mb(_tiny_model()) > SMALL_BUCKETS.bucket_cap_mb
    results = run_distributed(_train_anchor, 4, name, cap, timeout=60, pg_timeout=20)
    for r in results:
        assert r["iter"] == STEPS and r["compressed_buckets"] == [0]  # PowerSGD ran, on one bucket
        for p, p0 in zip(r["params"], r["initial"]):
            assert not torch.equal(p, p0)
    for r in results[1:]:
        for p, q in zip(results[0]["params"], r["params"]):
            assert torch.equal(p, q)


def test_powersgd_anchor_refuses_several_buckets_instead_of_hanging():
    with pytest.raises(AssertionError, match="needs all gradients in one DDP bucket"):
        run_distributed(_train_anchor, 4, "powersgd1", SMALL_BUCKETS.bucket_cap_mb, timeout=60, pg_timeout=20)


def test_powersgd_rows_state_their_configuration():
    table = format_table([{"method": "powersgd1", "status": "failed", "reason": "x"}])
    assert "ONE DDP bucket" in table and "one DDP bucket" in METHODS["powersgd2"].description


def _register_bf16(rank: int, world: int) -> dict:
    model = torch.nn.Linear(8, 4)
    ddp = DDP(model)
    try:
        METHODS["bf16"].attach(ddp, BenchConfig())
    except TypeError as e:
        return {"registered": False, "error": str(e)}
    torch.manual_seed(rank)
    ddp(torch.randn(2, 8)).sum().backward()
    grad = model.weight.grad.clone()
    dist.all_reduce(grad)  # a plain fp32 all-reduce of the (already averaged) grads: equal on every rank
    return {"registered": True, "grad": model.weight.grad, "sum": grad}


def test_bf16_anchor_runs_or_reports_ddps_reason():
    reason = bf16_hook_unavailable_reason()
    assert unavailable_reason(METHODS["bf16"]) == reason
    results = run_distributed(_register_bf16, 2, timeout=60)
    if reason is None:
        assert all(r["registered"] for r in results)
        assert torch.equal(results[0]["grad"], results[1]["grad"])
        assert results[0]["grad"].to(torch.bfloat16).float().equal(results[0]["grad"])  # bf16 values
    else:
        assert "bf16_compress_hook" in reason
        assert all(not r["registered"] and r["error"] in reason for r in results)

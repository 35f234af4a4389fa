"""A parameter's compression does not depend on its neighbours in a DDP bucket (issue 13): stochastic
rounding draws at (seed, step, parameter, offset inside the parameter), so the same layer quantized in
a bucket of its own or in a bucket shared with others rounds every element the same way."""

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import pycomm
from dist_utils import run_distributed
from resume_task import SmallNet, batch


def _worker_residuals(rank: int, world: int, cap: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ddp = DDP(SmallNet(), bucket_cap_mb=cap)
    state = pycomm.register(ddp, "quant", bits=2, start_iter=1, min_numel=256)
    for step in range(2):  # DDP rebuilds its buckets after step 0; step 1 is quantized
        ddp.zero_grad()
        x, y = batch(rank, step)
        F.cross_entropy(ddp(x), y).backward()
    buckets = len(state._plans)
    return {"buckets": buckets, **{name: f["worker"] for name, f in state.state_dict()["params"].items()}}


def test_a_layer_rounds_the_same_whatever_shares_its_bucket():
    one = run_distributed(_worker_residuals, 2, 25.0)       # every layer in one bucket
    many = run_distributed(_worker_residuals, 2, 0.005)     # about a bucket per layer
    assert one[0]["buckets"] == 1 and many[0]["buckets"] >= 3
    compared = 0
    for rank in range(2):
        for name in ("conv2.weight", "fc1.weight", "fc2.weight", "conv1.weight"):
            if name not in one[rank]:
                continue
            a, b = one[rank][name], many[rank][name]
            # The elements a rank reduces itself are not quantized in the first phase (their worker
            # residual is exactly 0); which ones those are follows the layout. Compare the others.
            both = (a != 0) & (b != 0)
            assert torch.equal(a[both], b[both]), (rank, name)
            compared += int(both.sum())
    assert compared > 5000

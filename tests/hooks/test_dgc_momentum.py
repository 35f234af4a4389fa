"""DGC at density 1 with momentum masking off sends every accumulated element every step, so it is
dense SGD with momentum: the hook's momentum correction equals torch.optim.SGD(momentum=m) on the
averaged gradient (Nesterov too), for any bucket layout. This catches u and v lost or misplaced when
DDP rebuilds its buckets (issue 13: with small buckets the conv layers drifted by 0.29)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import pycomm
from dist_utils import run_distributed
from resume_task import SmallNet, batch

STEPS = 8


def _train(rank: int, cap: float, nesterov: bool, dgc: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ddp = DDP(SmallNet(), bucket_cap_mb=cap)
    if dgc:
        pycomm.register(ddp, "dgc", density=1.0, momentum=0.9, nesterov=nesterov, momentum_masking=False,
                        min_numel=256)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov)
    for step in range(STEPS):
        x, y = batch(rank, step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


def _both(rank: int, world: int) -> dict:
    out = {}
    for cap in (25.0, 0.05):  # DDP's default cap (one bucket here) and many small buckets
        for nesterov in (False, True):
            out[(cap, nesterov)] = (_train(rank, cap, nesterov, True), _train(rank, cap, nesterov, False))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_dgc_at_density_one_is_sgd_with_momentum(world):
    results = run_distributed(_both, world)
    for key, (dgc, sgd) in results[0].items():
        for name in sgd:
            scale = float(sgd[name].abs().max())
            assert torch.allclose(dgc[name], sgd[name], rtol=0, atol=2e-5 * max(scale, 1.0)), (key, name)
    for r in results[1:]:  # and every rank holds the same model
        for key, (dgc, _) in r.items():
            assert all(torch.equal(dgc[n], results[0][key][0][n]) for n in dgc), key

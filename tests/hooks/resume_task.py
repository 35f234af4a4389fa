"""The resume experiment of issue 13, shared by the resume tests: a small CNN+MLP (about 40k
parameters) trained on fixed synthetic data with SGD under DDP and a pycomm method; either 20
uninterrupted steps, or 10 steps, a checkpoint (model, optimizer, every rank's hook state), then
fresh processes that load it and train to step 20."""

from __future__ import annotations

import io
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import pycomm

TOTAL_STEPS = 20
SAVE_AT = 10


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 1, 16, 16, generator=g)
    y = (x.mean(dim=(1, 2, 3)) * 40).long().clamp(-5, 4) + 5  # a learnable label
    return x, y


def build(method: Optional[str], options: dict[str, Any], bucket_cap_mb: float,
          sgd_momentum: float) -> tuple[DDP, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    ddp = DDP(SmallNet(), bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=sgd_momentum)
    state = pycomm.register(ddp, method, **options) if method else None
    return ddp, opt, state


def train(ddp: DDP, opt: torch.optim.Optimizer, rank: int, first: int, last: int) -> None:
    for step in range(first, last):
        x, y = batch(rank, step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def state_norms(state: Any) -> dict[str, float]:
    """Norm of each per-parameter field, summed over parameters (residual, u, v ...)."""
    if state is None:
        return {}
    sd = state.state_dict()
    norms: dict[str, float] = {}
    for fields in sd["params"].values():
        for key, t in fields.items():
            norms[key] = norms.get(key, 0.0) + float(t.double().square().sum())
    if "worker" in norms:  # what the quantization still owes the average, in gradient units
        world = dist.get_world_size()
        norms["owed"] = sum(float((f["worker"].double() + world * f["server"].double()).square().sum())
                            for f in sd["params"].values())
    return {k: v ** 0.5 for k, v in norms.items()}


def run(rank: int, world: int, method: Optional[str], options: dict[str, Any], bucket_cap_mb: float,
        sgd_momentum: float, checkpoint: Optional[bytes], resume_bucket_cap_mb: Optional[float],
        redraw_step: bool = False, drop_state: bool = False) -> dict[str, Any]:
    """Without ``checkpoint``: train to SAVE_AT, checkpoint, train on to TOTAL_STEPS (the uninterrupted
    run). With it: fresh model and state, load, train SAVE_AT..TOTAL_STEPS. ``redraw_step``: the
    uninterrupted run draws step SAVE_AT's random numbers from another seed (one step's
    quantization noise redrawn: the yardstick of a resume that cannot be exact). ``drop_state``: the
    resume loads the model and the optimizer but not the hook state (what issue 13's defect did)."""
    cap = bucket_cap_mb if checkpoint is None or resume_bucket_cap_mb is None else resume_bucket_cap_mb
    ddp, opt, state = build(method, options, cap, sgd_momentum)
    out: dict[str, Any] = {}
    if checkpoint is None:
        train(ddp, opt, rank, 0, SAVE_AT)
        everyone = pycomm.checkpoint.gather_state_dicts(state) if state is not None else None
        buffer = io.BytesIO()
        torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict(), "pycomm": everyone}, buffer)
        out["checkpoint"] = buffer.getvalue()
        out["saved_norms"] = state_norms(state)
        out["saved_choice"] = getattr(state, "choice", None)
    else:
        saved = torch.load(io.BytesIO(checkpoint), weights_only=True)  # plain data only
        ddp.module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if state is not None:
            everyone = saved["pycomm"]
            if drop_state:
                everyone = [pycomm.checkpoint.without_param_state(sd) for sd in everyone]
            out["loaded_own"] = pycomm.checkpoint.load_rank_state_dict(state, everyone)
    seeded = getattr(state, "inner", state)
    redraw_step = redraw_step and seeded is not None
    if redraw_step:
        seeded.seed += 1
    train(ddp, opt, rank, SAVE_AT, SAVE_AT + 1)
    if redraw_step:
        seeded.seed -= 1
    out["norms_after_first"] = state_norms(state)
    train(ddp, opt, rank, SAVE_AT + 1, TOTAL_STEPS)
    out["params"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    out["norms_end"] = state_norms(state)
    out["step"] = None if state is None else state.iter
    out["choice"] = getattr(state, "choice", None)  # L-GreCo's per-layer settings, by name
    dist.barrier()
    return out

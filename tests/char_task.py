"""A small real task for the DDP hook tests: a byte-level MLP on the standard library's source."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

CONTEXT = 8


def char_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(256, 32), torch.nn.Flatten(), torch.nn.Linear(32 * CONTEXT, 256), torch.nn.GELU(),
        torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))


def batch(data: torch.Tensor, gen: torch.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - CONTEXT - 1, (size,), generator=gen)
    idx = starts[:, None] + torch.arange(CONTEXT + 1)[None]
    window = data[idx].long()
    return window[:, :CONTEXT], window[:, CONTEXT]


def train(rank: int, method: str, kwargs: dict, steps: int,
          make_optimizer: Callable[[Any, bool], torch.optim.Optimizer]) -> dict[str, Any]:
    """Train the MLP under DDP with ``method`` ("allreduce": torch's allreduce_hook, else a pycomm
    method); ``make_optimizer(params, dense)``. Returns the held-out loss, the bytes each collective
    sent in the last step, the hook state and the final parameters."""
    import pycomm
    from pycomm.data import load_corpus
    from pycomm.traffic import CollectiveByteCounter
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    corpus = load_corpus(max_bytes=400_000)
    model = DDP(char_mlp(), bucket_cap_mb=0.25)
    state = None
    if method == "allreduce":
        model.register_comm_hook(None, allreduce_hook)
    else:
        state = pycomm.register(model, method, **kwargs)
    opt = make_optimizer(model.parameters(), method == "allreduce")
    gen = torch.Generator().manual_seed(100 + rank)
    counter = CollectiveByteCounter()
    last: Counter = Counter()
    for _ in range(steps):
        x, y = batch(corpus.train, gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        counter.reset()
        with counter:
            loss.backward()
        last = Counter(counter.bytes_by_collective)
        opt.step()
    eval_gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        xs, ys = zip(*[batch(corpus.held_out, eval_gen, 256) for _ in range(4)])
        eval_loss = torch.nn.functional.cross_entropy(model.module(torch.cat(xs)), torch.cat(ys)).item()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"eval_loss": eval_loss, "bytes_by_collective": last, "state": state, "params": params}

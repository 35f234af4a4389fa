"""A small real task for the DDP hook tests: a byte-level MLP on the standard library's source."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Optional

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
          make_optimizer: Callable[[Any, bool], torch.optim.Optimizer],
          wrap_hook: Optional[Callable[[Any, Callable], Callable]] = None,
          bucket_cap_mb: float = 0.25) -> dict[str, Any]:
    """Train the MLP under DDP with ``method`` ("allreduce": torch's allreduce_hook, else a pycomm
    method); ``make_optimizer(params, dense)``. ``wrap_hook(state, hook)``, if given, returns the
    hook to register instead of the method's own; ``bucket_cap_mb`` is DDP's. Returns the held-out loss, the bytes each
    collective sent in the last step, the hook state and the final parameters."""
    import pycomm
    from pycomm.bench.data import load_corpus
    from pycomm.traffic import CollectiveByteCounter
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    corpus = load_corpus(max_bytes=400_000)
    model = DDP(char_mlp(), bucket_cap_mb=bucket_cap_mb)
    state = None
    if method == "allreduce":
        model.register_comm_hook(None, allreduce_hook)
    elif wrap_hook is None:
        state = pycomm.register(model, method, **kwargs)
    else:
        captured: dict[str, Any] = {}

        class _Capture:  # takes the hook pycomm.register would install
            module = model.module  # the names the state is bound to

            def register_comm_hook(self, hook_state: Any, hook: Callable) -> None:
                captured["hook"] = hook

        state = pycomm.register(_Capture(), method, **kwargs)
        model.register_comm_hook(state, wrap_hook(state, captured["hook"]))
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

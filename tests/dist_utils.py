"""Run a function on W Gloo ranks (spawned processes) and collect what each returns."""

from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any,
           pg_timeout: Optional[float] = None) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        options = {} if pg_timeout is None else {"timeout": timedelta(seconds=pg_timeout)}
        dist.init_process_group("gloo", rank=rank, world_size=world, **options)
        result = fn(rank, world, *args)
        buffer = io.BytesIO()  # by value: shared-memory tensors die with this process
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0,
                    pg_timeout: Optional[float] = None) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` Gloo ranks; return the results in rank order.

    ``pg_timeout``: seconds a Gloo collective waits for its peers before raising (None: torch's
    default). Gloo takes CUDA tensors too, so ``fn`` may put every rank on ``cuda:0``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, pg_timeout)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world):
        try:
            rank, status, value = queue.get(timeout=timeout)
        except Exception:  # queue.Empty: a rank hung (e.g. a collective not called by every rank)
            errors.append(f"no result from a rank within {timeout} s")
            break
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{value}")
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]

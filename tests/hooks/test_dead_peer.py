"""A rank that dies mid-training: the survivors get a Python exception from Gloo (its peer's
connection closed) instead of hanging until the process-group timeout or aborting, and no
process is left behind."""

import io
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import _entry, free_port

WORLD = 3
VICTIM = 1
DEATH_STEP = 3
# Far below Gloo's default process-group timeout (30 min): a survivor that waits in a collective
# for the dead rank instead of failing shows up as a missing result.
RESULT_TIMEOUT_S = 90.0


def _train_until_a_peer_dies(rank, world, method, kwargs, how):
    import pycomm

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)))
    pycomm.register(model, method, **kwargs)
    for step in range(DEATH_STEP + 5):
        if rank == VICTIM and step == DEATH_STEP:
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step * 10 + rank))
        model.zero_grad()
        try:
            model(x).pow(2).sum().backward()
        except Exception as e:  # noqa: BLE001 (the test inspects whatever came out)
            return {"step": step, "type": type(e).__name__, "message": str(e)}
    return {"step": None, "type": None, "message": "finished without noticing the dead peer"}


@pytest.mark.parametrize("method, kwargs, how", [
    ("quant", {"bits": 4, "start_iter": 1}, "exit"),
    ("dgc", {"density": 0.01}, "sigkill"),
])
def test_survivors_raise_when_a_rank_dies(method, kwargs, how):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, WORLD, port, _train_until_a_peer_dies, (method, kwargs, how), queue))
             for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        results = {}
        for _ in range(WORLD - 1):
            rank, status, value = queue.get(timeout=RESULT_TIMEOUT_S)  # queue.Empty: a survivor hung
            assert status == "ok", value
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        assert sorted(results) == [r for r in range(WORLD) if r != VICTIM]
        for rank, result in results.items():
            # The survivors fail in the step where the victim is missing, with a Python exception.
            assert result["step"] == DEATH_STEP, (rank, result)
            # Gloo's own error: "Connection closed by peer" / "Read error ...: Connection reset by peer".
            assert result["type"] == "RuntimeError" and "by peer" in result["message"], (rank, result)
        for p in procs:
            p.join(timeout=60)
        # The survivors exit by themselves, normally; the victim as it was killed.
        codes = [p.exitcode for p in procs]
        expected_victim_code = 3 if how == "exit" else -signal.SIGKILL
        assert codes == [expected_victim_code if r == VICTIM else 0 for r in range(WORLD)], codes
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        queue.close()
    assert not any(p.is_alive() for p in procs)

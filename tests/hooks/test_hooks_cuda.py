"""pycomm's DDP hooks with CUDA tensors (run by ``make gpu-check``; skipped without a GPU).

Two kinds of test:

1. ``test_hook_does_not_sync_and_matches_cpu``: every hook's hot path (steps after the first,
   which builds the bucket plan and copies its tables to the GPU) runs under
   ``torch.cuda.set_sync_debug_mode("error")``, and returns the same bits as on the CPU.
   The collectives are replaced by :class:`IdenticalRanks`: stand-ins for W ranks that hold
   the same data, computed on the tensors' own device. A real backend cannot be used for
   this check at W > 1 on one GPU: NCCL takes one rank per GPU (and at W = 1 the quantized
   all-reduce returns before doing anything), and Gloo synchronises its own CUDA streams in
   its worker thread, which the (process-wide) sync debug mode reports as an error. So these
   tests check pycomm's own code for host waits and CPU/CUDA identity, not the exchange;
   the exchange between real ranks is the next test's job.

2. ``test_training_on_one_gpu``: each method trains a small model for a few steps in W = 2
   and 4 processes, all on ``cuda:0``, over Gloo. Gloo takes CUDA tensors in ``all_reduce``,
   ``broadcast`` (DDP's start-up), ``allgather`` (and so ``all_gather_into_tensor``, which it
   implements as an all-gather into the output's chunks) and ``all_to_all_single``
   (``alltoall_base``): it copies them to pinned host memory, runs the CPU algorithm and
   copies the result back (ProcessGroupGloo.cpp, the ``Async*CUDAWork`` classes). Gloo has no
   ``ReduceOp.AVG`` (the hooks sum and divide). Checked: no exception, every rank ends with
   bit-identical parameters, the losses are finite, follow the same run on the CPU within
   ``LOSS_TOLERANCE`` of the first loss, and (except for the SPSA projection, which
   delivers about K/n of the gradient per step) go down.

   Limits: Gloo completes its device copies before its future completes, and runs no kernel
   on a stream of its own, so stream-ordering bugs that only NCCL's asynchronous streams
   expose (e.g. a callback that reads a tensor another stream still writes) are not caught
   here, and nothing here measures NCCL's speed. The staging through host memory also makes
   these runs slow per byte: the model is small.
"""

import json
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from cuda_support import REQUIRES_CUDA
from dist_utils import run_distributed

pytestmark = REQUIRES_CUDA


# --------------------------------------------------------------------------------------------
# 1. No host synchronisation in the hot path, and CPU/CUDA identity
# --------------------------------------------------------------------------------------------

class _DoneWork:
    """What ``dist.*(..., async_op=True)`` returns, already completed."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._future: torch.futures.Future = torch.futures.Future()
        self._future.set_result([tensor])

    def wait(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        return self._future


class IdenticalRanks:
    """Collectives of W ranks that all hold this rank's data, as device-side tensor ops.

    ``all_reduce`` (SUM) multiplies by W, ``all_gather_into_tensor`` repeats the input W
    times, ``all_to_all_single`` hands every rank's slot back unchanged. Deterministic and the
    same on every device, so a hook fed the same gradients must give the same bits on CPU
    and CUDA; none of them waits for the device.
    """

    def __init__(self, world: int) -> None:
        self.world = world

    def get_world_size(self, group=None) -> int:
        return self.world

    def get_rank(self, group=None) -> int:
        return 0

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op == dist.ReduceOp.SUM:
            tensor.mul_(self.world)
        elif op not in (dist.ReduceOp.MAX, dist.ReduceOp.MIN):
            raise ValueError(f"IdenticalRanks does not emulate {op}")
        return _DoneWork(tensor) if async_op else None

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        output.copy_(input)
        return _DoneWork(output) if async_op else None

    def all_gather_into_tensor(self, output, input, group=None, async_op=False):
        output.view(self.world, -1).copy_(input.reshape(1, -1).expand(self.world, -1))
        return _DoneWork(output) if async_op else None

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):  # the settings agreement check
        for out in tensor_list:
            out.copy_(tensor)
        return _DoneWork(tensor) if async_op else None

    def install(self, monkeypatch) -> None:
        for name in ("get_world_size", "get_rank", "all_reduce", "all_to_all_single", "all_gather_into_tensor",
                     "all_gather"):
            monkeypatch.setattr(dist, name, getattr(self, name))
        if hasattr(dist, "all_gather_single"):  # torch 2.13+: pycomm.distributed prefers it
            monkeypatch.setattr(dist, "all_gather_single", self.all_gather_into_tensor)


class _Bucket:
    """What the hooks read of a DDP GradBucket."""

    def __init__(self, buffer: torch.Tensor, params: list) -> None:
        self._buffer, self._params = buffer, params

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def parameters(self) -> list:
        return self._params


# Two compressed layers (>= 1024 elements, 2-D) and three that go dense (biases, a small matrix).
LAYER_SHAPES = [(64, 48), (64,), (32, 64), (32,), (10, 32)]
SYNC_FREE_STEPS = (3, 4)  # step 0 plans; L-GreCo solves after steps 1 and 5 and replans at step 2
STEPS = 6


def _state(method: str):
    from pycomm import hooks

    if method == "quant":
        return hooks.QuantState(bits=4, start_iter=0), hooks.quantized_allreduce_hook
    if method == "dgc":
        return hooks.DGCState(density=0.01), hooks.dgc_hook
    if method.startswith("lgreco"):
        family = method.split("-")[1]
        default = 4 if family == "quant" else 0.01
        state = hooks.LGreCoState(family=family, default=default, start_iter=2, period=4, acc_steps=2)
        return state, hooks.lgreco_hook
    if method == "spsa-projection":
        return hooks.ProjectionState(num_directions=16, error_feedback=True), hooks.projection_hook
    raise ValueError(method)


def _run_hook(method: str, device: str, sync_checked: bool) -> list[torch.Tensor]:
    state, hook = _state(method)
    # Parameters (requiring grad, as DDP's are) whose names the state's per-parameter state is keyed by.
    params = [torch.zeros(shape, device=device, requires_grad=True) for shape in LAYER_SHAPES]
    state.bind({f"layer{i}": p for i, p in enumerate(params)})
    numel = sum(p.numel() for p in params)
    outputs = []
    for step in range(STEPS):
        grad = torch.randn(numel, generator=torch.Generator().manual_seed(100 + step)).to(device)
        checked = sync_checked and step in SYNC_FREE_STEPS
        if checked:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = hook(state, _Bucket(grad, params)).value()
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode(0)
        outputs.append(out.cpu())
    return outputs


HOOK_METHODS = ["quant", "dgc", "lgreco-quant", "lgreco-topk", "spsa-projection"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", HOOK_METHODS)
def test_hook_does_not_sync_and_matches_cpu(monkeypatch, method, world):
    IdenticalRanks(world).install(monkeypatch)
    gpu = _run_hook(method, "cuda", sync_checked=True)
    cpu = _run_hook(method, "cpu", sync_checked=False)
    for step, (c, g) in enumerate(zip(cpu, gpu)):
        assert c.dtype == g.dtype and c.shape == g.shape
        same = (c.view(torch.int32) == g.view(torch.int32)).logical_or_(c.isnan() & g.isnan())
        assert bool(same.all()), (f"{method}, step {step}: CPU and CUDA differ at {int((~same).sum())} of "
                                  f"{same.numel()} elements, first {(~same).nonzero()[:5].flatten().tolist()}")
        assert torch.isfinite(c).all() and c.abs().sum() > 0, f"{method}, step {step}: degenerate output"


# --------------------------------------------------------------------------------------------
# 2. Training at W = 2 and 4, all ranks on cuda:0, over Gloo
# --------------------------------------------------------------------------------------------

# name -> (pycomm.register method, options)
TRAINED_METHODS = {
    "quant": ("quant", {"bits": 4, "start_iter": 1}),
    "dgc": ("dgc", {"density": 0.05}),
    "lgreco-quant": ("lgreco", {"family": "quant", "default": 4, "start_iter": 3, "period": 4, "acc_steps": 2}),
    "lgreco-topk": ("lgreco", {"family": "topk", "default": 0.05, "start_iter": 3, "period": 4, "acc_steps": 2}),
    "spsa-projection": ("spsa-projection", {"num_directions": 32}),
}
TRAIN_STEPS = 12
# The CPU and CUDA runs start from the same weights and data; their float32 rounding differs
# (different matmul kernels), which can flip a few stochastic-rounding or top-k choices per
# step. Losses must agree within this fraction of the first loss at every step.
LOSS_TOLERANCE = 0.02
NOT_DECREASING = {"spsa-projection"}  # K/n of the gradient per step: too little for 12 steps
PG_TIMEOUT_S = 60.0


def _train(rank: int, world: int, method: str, options: dict, device: str) -> dict:
    import pycomm
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 4))
    teacher = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(10 + rank))
    y = torch.tanh(x @ teacher)
    model = DDP(net.to(device))
    pycomm.register(model, method, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = x.to(device), y.to(device)
    losses = []
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    return {"losses": losses, "params": params}


def _training_worker(rank: int, world: int, names: list, devices: list) -> dict:
    if "cuda" in devices:
        torch.cuda.set_device(0)
    results: dict = {}
    for name in names:
        method, options = TRAINED_METHODS[name]
        for device in devices:
            try:
                results[(name, device)] = _train(rank, world, method, options, device)
            except Exception:
                # Stop here: the peers may be inside a collective this rank left; they time out
                # (PG_TIMEOUT_S) and stop too, so every rank still reports.
                results[(name, device)] = {"error": f"rank {rank}, {name} on {device}:\n{traceback.format_exc()}"}
                return results
    return results


def check_training(name: str, per_rank: list, devices: tuple = ("cpu", "cuda")) -> list[str]:
    """What is wrong with ``name``'s runs (one dict per rank from :func:`_training_worker`)."""
    problems = []
    for device in devices:
        runs = [r.get((name, device)) for r in per_rank]
        errors = [run["error"] for run in runs if run and "error" in run]
        if errors:
            return problems + errors
        if any(run is None for run in runs):
            return problems + [f"{name} on {device} was not reached (an earlier method failed)"]
        for rank, run in enumerate(runs[1:], 1):
            if not torch.equal(run["params"], runs[0]["params"]):
                diff = (run["params"] - runs[0]["params"]).abs().max().item()
                problems.append(f"{name} on {device}: rank {rank}'s parameters differ from rank 0's (max {diff:.3g})")
        for rank, run in enumerate(runs):
            losses = run["losses"]
            if not all(math.isfinite(v) for v in losses):
                problems.append(f"{name} on {device}, rank {rank}: non-finite loss {losses}")
            elif name not in NOT_DECREASING and not losses[-1] < 0.9 * losses[0]:
                problems.append(f"{name} on {device}, rank {rank}: loss did not decrease by 10%: {losses}")
    if "cpu" in devices and "cuda" in devices and not problems:
        for rank, r in enumerate(per_rank):
            cpu, gpu = r[(name, "cpu")]["losses"], r[(name, "cuda")]["losses"]
            worst = max(abs(a - b) for a, b in zip(cpu, gpu))
            if worst > LOSS_TOLERANCE * cpu[0]:
                problems.append(f"{name}, rank {rank}: CUDA losses leave the CPU run's by {worst:.4g} "
                                f"(> {LOSS_TOLERANCE} x {cpu[0]:.4g}): CPU {cpu}, CUDA {gpu}")
    return problems


def _record(world: int, per_rank) -> None:
    """For make gpu-check's summary: rank 0's losses per method and device, or the failure."""
    folder = os.environ.get("PYCOMM_GPU_CHECK_OUT")
    if not folder:
        return
    path = os.path.join(folder, "hooks_training.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    if isinstance(per_rank, Exception):
        data[str(world)] = {"error": str(per_rank)[-2000:]}
    else:
        data[str(world)] = {f"{name} {device}": (run.get("error", "")[-2000:] if "error" in run else run["losses"])
                            for (name, device), run in per_rank[0].items()}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


@pytest.fixture(scope="module")
def training_runs():
    """``get(world)``: every method's runs at ``world`` ranks (one spawn per world size)."""
    runs: dict = {}

    def get(world: int):
        if world not in runs:
            try:
                runs[world] = run_distributed(_training_worker, world, list(TRAINED_METHODS), ["cpu", "cuda"],
                                              timeout=300.0, pg_timeout=PG_TIMEOUT_S)
            except AssertionError as e:  # a rank crashed or hung: every method at this W fails with it
                runs[world] = e
            _record(world, runs[world])
        return runs[world]

    return get


@pytest.mark.parametrize("name", list(TRAINED_METHODS))
@pytest.mark.parametrize("world", [2, 4])
def test_training_on_one_gpu(training_runs, world, name):
    per_rank = training_runs(world)
    if isinstance(per_rank, Exception):
        pytest.fail(f"the W={world} run stopped: {per_rank}", pytrace=False)
    problems = check_training(name, per_rank)
    assert not problems, "\n".join(problems)

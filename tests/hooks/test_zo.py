"""One-byte SPSA (pycomm.zo) and the shared-seed projection hook."""


import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_distributed


def _regression(seed=0):
    """A linear teacher (the same on every rank) and ``seed``'s own inputs."""
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    return x, x @ w + 0.01 * torch.randn(256, 1, generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(32, 1))


def test_single_process_matches_pure_torch_mezo_step():
    import pycomm

    x, y = _regression()
    model = _model()
    params0 = [p.detach().clone() for p in model.parameters()]
    opt = pycomm.zo.SPSA(model, lr=0.01, eps=1e-3, seed=3)

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    opt.step(closure)
    # Reference: the same variates, materialized, and the MeZO step in pure torch.
    seed = opt.seed_for(0, 0)
    zs, off = [], 0
    for p in params0:
        zs.append(pycomm.ops.philox_normal(p.numel(), seed, offset=off).view_as(p))
        off += p.numel()
    ref = _model()
    ref.eval()  # perturbed forwards in eval mode: dropout off
    with torch.no_grad():
        for p, p0, z in zip(ref.parameters(), params0, zs):
            p.copy_(p0 + torch.tensor(1e-3, dtype=torch.float32) * z)
        lp = torch.nn.functional.mse_loss(ref(x), y).item()
        for p, p0, z in zip(ref.parameters(), params0, zs):
            p.copy_(p0 + torch.tensor(-1e-3, dtype=torch.float32) * z)
        lm = torch.nn.functional.mse_loss(ref(x), y).item()
    g_hat = float(opt.codec.decode(opt.codec.encode(torch.tensor([(lp - lm) / 2e-3], dtype=torch.float64)))[0])
    alpha = torch.tensor(-0.01 * g_hat, dtype=torch.float32)
    for p, p0, z in zip(model.parameters(), params0, zs):
        assert torch.equal(p.detach(), p0 + alpha * z)  # exact: theta minus the update
    assert model.training  # training mode restored
    # Memory: perturbed copies never exceed the largest module's parameters.
    largest = max(sum(q.numel() * 4 for q in m.parameters(recurse=False)) for m in model.modules())
    assert 0 < opt.peak_perturbed_bytes <= largest


def _spsa_worker(rank, world, steps, late_join):
    import pycomm
    from pycomm.traffic import CollectiveByteCounter

    x, y = _regression(seed=rank + 1)  # each rank its own data
    torch.manual_seed(rank)  # different initial weights: sync() must fix that
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = pycomm.zo.SPSA(model, lr=0.005, eps=1e-3, seed=11)
    opt.sync(src=0)

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    losses, sent = [], []
    counter = CollectiveByteCounter()
    for step in range(steps):
        if late_join and step == steps // 2:
            if rank == world - 1:  # a late joiner: wrong parameters and step, until it syncs
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
                opt.load_state_dict({"step": 0, "seed": 11})
            opt.sync(src=0)  # a collective: every rank takes part
        with counter:
            losses.append(opt.step(closure))
        sent.append(counter.bytes_by_collective.get("all_gather_single", 0)
                    + counter.bytes_by_collective.get("all_gather_into_tensor", 0))
        counter.reset()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"losses": losses, "params": params, "sent": sent, "step": opt.step_count}


@pytest.mark.parametrize("world", [2, 4])
def test_spsa_ranks_stay_bit_identical_and_loss_decreases(world):
    steps = 200
    results = run_distributed(_spsa_worker, world, steps, world == 4)
    for r in results[1:]:
        assert torch.equal(r["params"], results[0]["params"]), "ranks diverged"
        assert r["step"] == results[0]["step"] == steps
    for r in results:
        assert all(s == world - 1 for s in r["sent"])  # one byte to each of the W-1 peers, nothing else
        first, last = sum(r["losses"][:20]) / 20, sum(r["losses"][-20:]) / 20
        assert last < 0.5 * first, (first, last)


def _projection_worker(rank, world):
    import pycomm
    from pycomm.traffic import CollectiveByteCounter

    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(64, 8))
    state = pycomm.register(model, "spsa-projection", num_directions=4, error_feedback=True)
    counter = CollectiveByteCounter()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(rank))
    model(x).pow(2).sum().backward()  # the first step also agrees on the settings (pycomm.hooks.agreement)
    model.zero_grad()
    with counter:
        model(x).pow(2).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    sd = state.state_dict()
    return grads, dict(counter.calls), counter.bytes_sent, sd["params"]


def test_projection_hook_sends_k_bytes_and_ranks_agree():
    results = run_distributed(_projection_worker, 2)
    (g0, calls, sent, res0), (g1, _, _, res1) = results
    assert torch.equal(g0, g1)
    assert sent == 4 * 1  # K bytes to the one peer, one bucket
    assert torch.isfinite(g0).all() and g0.abs().sum() > 0
    assert sorted(res0) == ["bias", "weight"] and res0["weight"]["residual"].shape == (8, 64)  # per parameter
    assert res0["weight"]["residual"].abs().sum() > 0
    assert not torch.equal(res0["weight"]["residual"], res1["weight"]["residual"]), "each rank keeps its own"


def _projection_overflow_worker(rank, world):
    from pycomm.hooks.spsa_projection import ProjectionState, projection_hook

    weight = torch.zeros(50, 100, requires_grad=True)  # DDP buckets only parameters that require grad
    state = ProjectionState(num_directions=4, error_feedback=True).bind({"w": weight})
    g = torch.randn(5000, generator=torch.Generator().manual_seed(rank))
    projection_hook(state, _Bucket(g.clone(), [weight])).value()  # a finite step first: a non-zero residual
    before = state.state_dict()["params"]["w"]["residual"]
    assert before.abs().sum() > 0
    g = torch.randn(5000, generator=torch.Generator().manual_seed(10 + rank))
    if rank == 1:
        g[17] = float("inf")
    out = projection_hook(state, _Bucket(g.clone(), [weight])).value()
    exact = g.clone()
    torch.distributed.all_reduce(exact)
    return out, exact.div_(world), torch.equal(state.state_dict()["params"]["w"]["residual"], before)


@pytest.mark.parametrize("world", [2, 4])
def test_projection_overflow_goes_uncompressed(world):
    # One rank's Inf travels as the codec's non-finite byte; every rank then all-reduces the
    # bucket uncompressed (CPU), so GradScaler sees the exact overflow, and no residual changes.
    for out, exact, residual_kept in run_distributed(_projection_overflow_worker, world):
        assert torch.equal(out, exact) and not torch.isfinite(out).all()
        assert residual_kept


class _Bucket:
    """What projection_hook reads of a DDP GradBucket."""

    def __init__(self, buffer, parameters, index=0, last=True):
        self._buffer, self._parameters, self._index, self._last = buffer, parameters, index, last

    def buffer(self):
        return self._buffer

    def parameters(self):
        return list(self._parameters)

    def index(self):
        return self._index

    def is_last(self):
        return self._last


def test_projection_hook_equals_per_direction_reference(tmp_path):
    # One rank (Gloo, in process): the hook's K-direction kernels and device-side codec give
    # exactly what per-direction philox_dot / philox_axpy_ and the float64 codec definition give.
    import torch.distributed as dist
    from pycomm import ops
    from pycomm.distributed import mix_seed
    from pycomm.hooks.spsa_projection import ProjectionState, projection_hook

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        k = 40
        # Two parameters that DDP's bucket holds in reverse model order (as after its rebuild):
        # the directions are drawn over the model-order concatenation [a, b], keyed (seed, step, j).
        a_param, b_param = torch.zeros(61, 100, requires_grad=True), torch.zeros(3907, requires_grad=True)
        n_a, n_b = a_param.numel(), b_param.numel()
        n = n_a + n_b

        def model_order(t):  # bucket layout [b, a] -> model layout [a, b]
            return torch.cat([t[n_b:], t[:n_b]])

        state = ProjectionState(num_directions=k, seed=5, error_feedback=True).bind({"a": a_param, "b": b_param})
        residual = torch.zeros(n)  # model order
        for step in range(3):
            g = torch.randn(n, generator=torch.Generator().manual_seed(step))  # bucket order
            out = projection_hook(state, _Bucket(g.clone(), [b_param, a_param], index=2)).value()
            x = model_order(g) + residual
            seeds = [mix_seed(5, step, j) for j in range(k)]
            a = torch.tensor([ops.philox_dot([x], s) / n for s in seeds], dtype=torch.float64)
            a_hat = state.codec.decode(state.codec.encode_reference(a))
            assert (a_hat != 0).sum() > k // 2
            residual, ref = x.clone(), torch.zeros(n)
            for s, c in zip(seeds, a_hat.tolist()):
                if c != 0.0:
                    ops.philox_axpy_(residual, s, -c)
                    ops.philox_axpy_(ref, s, c)
            assert torch.equal(model_order(out).view(torch.int32), ref.view(torch.int32))
            saved = state.state_dict()["params"]
            assert saved["a"]["residual"].shape == (61, 100)
            got = torch.cat([saved["a"]["residual"].reshape(-1), saved["b"]["residual"]])
            assert torch.equal(got.view(torch.int32), residual.view(torch.int32))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", range(1, 10))
def test_projection_rank_sum_order(world):
    from pycomm.hooks.spsa_projection import _rank_sum

    rows = torch.randn(world, 3, dtype=torch.float64) * torch.logspace(-8, 8, world, dtype=torch.float64)[:, None]
    parts = list(rows)
    while len(parts) > 1:  # halving: row i + row i + h, an odd last row carried over
        h = len(parts) // 2
        parts = [parts[i] + parts[i + h] for i in range(h)] + parts[2 * h:]
    assert torch.equal(_rank_sum(rows), parts[0])
    assert torch.allclose(_rank_sum(rows), rows.sum(0), rtol=1e-12, atol=0)


def test_projection_state_rejects_checkpoints_that_do_not_fit():
    from pycomm.hooks import ProjectionState, QuantState
    from pycomm.hooks.param_state import CheckpointMismatch

    params = {"w": torch.zeros(4, 8)}
    quant = QuantState(bits=4).bind(params).state_dict()
    with pytest.raises(CheckpointMismatch, match="method 'quant'"):
        ProjectionState(num_directions=4).bind(params).load_state_dict(quant)
    with pytest.raises(CheckpointMismatch, match="not a pycomm state dict"):  # the old format
        ProjectionState(num_directions=4).load_state_dict({"iter": 5, "seed": 3, "residuals": {0: torch.zeros(4)}})
    saved = ProjectionState(num_directions=4, error_feedback=True, seed=3).bind(params).state_dict()
    saved["step"] = 5
    saved["params"] = {"w": {"residual": torch.ones(4, 8)}}
    with pytest.raises(CheckpointMismatch, match="num_directions=4"):
        ProjectionState(num_directions=8, error_feedback=True, seed=3).bind(params).load_state_dict(saved)
    with pytest.raises(CheckpointMismatch, match="'residual'"):  # no error feedback here: nothing keeps it
        ProjectionState(num_directions=4, seed=3).bind(params).load_state_dict(
            {**saved, "config": {**saved["config"], "error_feedback": False}})
    with pytest.raises(CheckpointMismatch, match=r"shape \(4, 8\).*\(8, 4\)"):
        ProjectionState(num_directions=4, error_feedback=True, seed=3).bind({"w": torch.zeros(8, 4)}).load_state_dict(saved)
    state = ProjectionState(num_directions=4, error_feedback=True, seed=3).bind(params)
    state.load_state_dict(saved)
    assert state.iter == 5 and torch.equal(state.state_dict()["params"]["w"]["residual"], torch.ones(4, 8))
    # strict=False keeps this state's own settings and takes the step and what fits.
    lenient = ProjectionState(num_directions=8, error_feedback=True, seed=3).bind(params)
    lenient.load_state_dict(saved, strict=False)
    assert lenient.num_directions == 8 and lenient.iter == 5
    assert torch.equal(lenient.state_dict()["params"]["w"]["residual"], torch.ones(4, 8))

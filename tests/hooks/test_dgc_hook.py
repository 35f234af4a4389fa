"""The DGC DDP hook on 2 and 4 Gloo ranks: equivalence with momentum SGD, convergence, bytes, state."""

import io

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_distributed
from char_task import train
from pycomm.hooks.param_state import CheckpointMismatch


def _flat(state_dict, field):
    """One per-parameter field of a state dict, concatenated in name order."""
    return torch.cat([fields[field].reshape(-1) for _, fields in sorted(state_dict["params"].items())])


def _equivalence_worker(rank, world, nesterov):
    import pycomm

    results = {}
    for mode in ("dense", "dgc"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
        model = DDP(net)
        if mode == "dgc":
            pycomm.register(model, "dgc", density=1.0, momentum=0.9, nesterov=nesterov, momentum_masking=False,
                            min_numel=1024)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov)
        for step in range(6):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step * 10 + rank))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        results[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return results


@pytest.mark.parametrize("nesterov", [False, True])
def test_density_one_equals_momentum_sgd(nesterov):
    for r in run_distributed(_equivalence_worker, 2, nesterov):
        assert torch.allclose(r["dgc"], r["dense"], atol=1e-5, rtol=1e-5), (r["dgc"] - r["dense"]).abs().max()


def _sgd(params, dense):
    # Dense: momentum in the optimizer. DGC: momentum lives in the hook.
    return torch.optim.SGD(params, lr=0.3, momentum=0.9 if dense else 0.0)


def _train_worker(rank, world, method, kwargs, steps):
    import pycomm

    result = train(rank, method, kwargs, steps, _sgd)
    state, sent = result["state"], result["bytes_by_collective"]
    expected = None
    if state is not None:  # k * (value bytes + index bytes) + a 4-byte flag per bucket, to W-1 peers
        per_bucket = [sum(pycomm.ops.topk_count(n, state.density) for _, n in plan.compressed)
                      for plan in state._plans.values() if plan.compressed]
        expected = (world - 1) * sum(k * (4 + 4) + 4 for k in per_bucket)
    return {"eval_loss": result["eval_loss"], "params": result["params"], "expected": expected,
            "gathered": sent.get("all_gather_single", 0) + sent.get("all_gather_into_tensor", 0)}


@pytest.mark.parametrize("world", [2, 4])
def test_dgc_at_0_1_percent_converges_and_sends_k_values(world):
    steps = 150
    dense = run_distributed(_train_worker, world, "allreduce", {}, steps)
    dgc = run_distributed(_train_worker, world, "dgc", {"density": 0.001, "momentum": 0.9, "warmup_steps": 10},
                          steps)
    for r in dgc[1:]:
        assert torch.equal(r["params"], dgc[0]["params"]), "ranks diverged"
    assert dense[0]["eval_loss"] < 5.545 - 2.0
    # Stated tolerance: after only 150 steps, 0.1% DGC (with the paper's warm-up) ends within 0.5 nats
    # of dense momentum SGD (measured: 2.38 vs 1.97 at W=4); both start at ln(256) = 5.55.
    assert dgc[0]["eval_loss"] <= dense[0]["eval_loss"] + 0.5, (dgc[0]["eval_loss"], dense[0]["eval_loss"])
    for r in dgc:
        assert r["gathered"] == r["expected"]


def _warmup_worker(rank, world):
    import pycomm

    state = pycomm.hooks.DGCState(density=0.001, warmup_steps=2)
    sched = [state.density_at(s) for s in range(10)]
    epochs = pycomm.hooks.DGCState(density=0.001, warmup_epochs=4, steps_per_epoch=3)
    return sched, [epochs.density_at(s) for s in range(14)]


def test_warmup_schedule():
    (sched, epochs), = run_distributed(_warmup_worker, 1)
    assert sched == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.004, 0.004, 0.001, 0.001]
    assert epochs[:3] == [0.25] * 3 and epochs[12:] == [0.001, 0.001]


def _nan_and_checkpoint_worker(rank, world):
    import pycomm

    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(256, 32))
    state = pycomm.register(model, "dgc", density=0.01, min_numel=1024)
    for step in range(3):
        model.zero_grad()
        model(torch.randn(4, 256, generator=torch.Generator().manual_seed(step + rank))).sum().backward()
    before = {k: _flat(state.state_dict(), k) for k in ("u", "v")}
    # An overflow on rank 1 only.
    model.zero_grad()
    x = torch.randn(4, 256)
    if rank == 1:
        x[0, 0] = float("inf")
    model(x).sum().backward()
    grad_has_nonfinite = not bool(torch.isfinite(model.module.weight.grad).all())
    after = {k: _flat(state.state_dict(), k) for k in ("u", "v")}
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    restored = pycomm.hooks.DGCState(density=0.01, min_numel=1024).bind(model)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert sorted(restored.state_dict()["params"]) == ["bias", "weight"]  # the dense bias keeps its momentum u
    assert all(torch.equal(_flat(restored.state_dict(), k), after[k]) for k in ("u", "v"))
    return grad_has_nonfinite, before, after, restored.iter


def test_overflow_goes_uncompressed_and_state_is_per_rank():
    results = run_distributed(_nan_and_checkpoint_worker, 2)
    for rank, (nonfinite, before, after, it) in enumerate(results):
        assert nonfinite, "the overflow must reach every rank's gradients (GradScaler)"
        assert it == 4
        if rank == 1:  # the overflowing rank's accumulators are untouched
            assert torch.equal(before["u"], after["u"]) and torch.equal(before["v"], after["v"])
        assert torch.isfinite(after["u"]).all() and torch.isfinite(after["v"]).all()
    assert not torch.equal(results[0][2]["v"], results[1][2]["v"]), "each rank keeps its own accumulators"


# ---- per-layer densities (set_layer_params), observer, checkpoint ------------------------------

def _stable_topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |v| (ties to the lower index), ascending."""
    return torch.sort(v.double().abs(), descending=True, stable=True).indices[:k].sort().values


def _layer_net() -> torch.nn.Module:
    torch.manual_seed(0)  # three compressed weights (4096, 3072, 1536 elements) and dense biases in one bucket
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 32))


def _inputs(step: int, rank: int) -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1000 * step + rank))


def _per_layer_worker(rank, world, overrides_at, steps, nesterov):
    """Trains with the DGC hook, giving layers their own densities from step 2 on (DDP's bucket
    layout, and so the layer keys, is stable from step 1), and replays the algorithm in pure torch
    for all W ranks (ALGORITHMS.md section 1 with a k per layer)."""
    import pycomm
    from pycomm.traffic import CollectiveByteCounter

    m, lr, warmup = 0.9, 0.1, (0.25, 0.25, 0.0625)
    model = DDP(_layer_net())
    state = pycomm.register(model, "dgc", density=0.01, momentum=m, nesterov=nesterov, min_numel=1024,
                            warmup_steps=1, warmup_densities=warmup)
    seen = []
    state.observer = lambda values, layers: seen.append((values.clone(), layers))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    replica = _layer_net()  # computes every rank's local gradient at the current parameters
    counter = CollectiveByteCounter()
    ref_u = ref_v = None
    report = {"max_err": 0.0, "bytes_ok": True, "observer_ok": True, "ks": [], "sizes": []}
    for step in range(steps):
        overrides = {}
        if step >= 2:
            (plan,) = state._plans.values()
            overrides = {name: d for (name, _, _, _), d in zip(plan.layers, overrides_at)}
            if step == 2:
                state.set_layer_params(overrides)
        seen.clear()
        opt.zero_grad()
        counter.reset()
        with counter:
            model(_inputs(step, rank)).pow(2).mean().backward()
        (plan,) = state._plans.values()
        params = [state.parameter_names.params[name] for name in plan.names]
        numel = sum(p.numel() for p in params)
        # Reference: local gradients of every rank, and u and v per parameter (module order), flattened
        # in this step's bucket order.
        order = [{id(p): i for i, p in enumerate(model.module.parameters())}[id(p)] for p in params]
        replica.load_state_dict(model.module.state_dict())
        grads = []
        for r in range(world):
            replica.zero_grad()
            replica(_inputs(step, r)).pow(2).mean().backward()
            replica_params = list(replica.parameters())
            grads.append(torch.cat([replica_params[i].grad.reshape(-1) for i in order]))
        if ref_u is None:
            ref_u = [[torch.zeros(p.numel()) for p in model.module.parameters()] for _ in range(world)]
            ref_v = [[torch.zeros(p.numel()) for p in model.module.parameters()] for _ in range(world)]
        flat_u = [torch.cat([ref_u[r][i] for i in order]) for r in range(world)]
        flat_v = [torch.cat([ref_v[r][i] for i in order]) for r in range(world)]
        stage = warmup[step] if step < len(warmup) else None
        ks = []
        for name, o, n, _ in plan.layers:
            d = overrides.get(name, state.density)
            d = d if stage is None else max(stage, d)
            ks.append(pycomm.ops.topk_count(n, d))
        report["ks"].append(ks)
        report["sizes"].append([n for _, n in plan.compressed])
        total = torch.zeros(numel)
        observed_v = None
        for r in range(world):
            u, v, g = flat_u[r], flat_v[r], grads[r]
            for o, n in plan.compressed:
                s = slice(o, o + n)
                if nesterov:
                    u[s] = m * (u[s] + g[s])
                    v[s] = v[s] + (u[s] + g[s])
                else:
                    u[s] = m * u[s] + g[s]
                    v[s] = v[s] + u[s]
            if r == rank:
                observed_v = v.clone()
            for (o, n), k in zip(plan.compressed, ks):
                idx = _stable_topk(v[o:o + n], k) + o
                total[idx] += v[idx]
                v[idx] = 0
                u[idx] = 0
        expected = total / world
        dense_avg = sum(grads) / world
        for o, n in plan.dense:
            s = slice(o, o + n)
            u0 = flat_u[0][s]  # dense momentum is the same on every rank
            if nesterov:
                new_u = m * (u0 + dense_avg[s])
                out = new_u + dense_avg[s]
            else:
                new_u = m * u0 + dense_avg[s]
                out = new_u
            for r in range(world):
                flat_u[r][s] = new_u
            expected[s] = out
        for r in range(world):
            for i, uu, vv in zip(order, flat_u[r].split([p.numel() for p in params]),
                                 flat_v[r].split([p.numel() for p in params])):
                ref_u[r][i], ref_v[r][i] = uu, vv
        got = torch.cat([p.grad.reshape(-1) for p in params])
        report["max_err"] = max(report["max_err"], (got - expected).abs().max().item())
        sent = counter.bytes_by_collective
        gathered = sent.get("all_gather_single", 0) + sent.get("all_gather_into_tensor", 0)
        report["bytes_ok"] &= gathered == (world - 1) * (sum(ks) * (4 + 4) + 4)
        (values, layers), = seen
        report["observer_ok"] &= (values.dtype == torch.float32 and values.numel() == numel
                                  and layers == plan.layers and torch.equal(values, observed_v))
        opt.step()
    report["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    report["layer_params"] = state.layer_params
    report["layers"] = plan.layers
    return report


@pytest.mark.parametrize("world,nesterov", [(2, False), (4, True)])
def test_per_layer_densities_in_one_bucket(world, nesterov):
    steps = 6
    results = run_distributed(_per_layer_worker, world, (0.1, 0.02, 1.0), steps, nesterov)
    r0 = results[0]
    sizes = r0["sizes"]  # compressed layer sizes per step, in buffer order (DDP reorders after step 0)
    assert sorted(sizes[0]) == [1536, 3072, 4096] and len(r0["layer_params"]) == 3
    # Steps 0-1: no overrides (warm-up 25%); step 2: warm-up 6.25% floors the layer densities; then their own.
    ks = r0["ks"]
    assert ks[0] == [max(1, -(-n // 4)) for n in sizes[0]]
    assert ks[2] == [pycomm_count(n, d) for n, d in zip(sizes[2], (0.1, 0.0625, 1.0))]
    assert ks[3] == [pycomm_count(n, d) for n, d in zip(sizes[3], (0.1, 0.02, 1.0))]
    for r in results:
        assert r["bytes_ok"], "bytes sent must match the per-layer counts"
        assert r["observer_ok"], "the observer must see v after momentum correction, before top-k"
        assert r["max_err"] < 1e-6, r["max_err"]
        assert torch.equal(r["params"], r0["params"]), "ranks diverged"


def pycomm_count(n: int, density: float) -> int:
    import pycomm

    return pycomm.ops.topk_count(n, density)


def _same_bytes_worker(rank, world, mode):
    import pycomm

    model = DDP(_layer_net())
    state = pycomm.register(model, "dgc", density=0.02, momentum=0.9, min_numel=1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    for step in range(4):
        if step == 2 and mode != "none":  # the bucket layout is stable from step 1
            (plan,) = state._plans.values()
            # "default": every layer at the default density (the 3-column path); "cleared": set then cleared.
            state.set_layer_params({name: 0.02 if mode == "default" else 0.5 for name, _, _, _ in plan.layers})
            if mode == "cleared":
                state.set_layer_params(None)
        opt.zero_grad()
        model(_inputs(step, rank)).pow(2).mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_overrides_at_the_default_density_send_the_same_bytes():
    base = run_distributed(_same_bytes_worker, 2, "none")
    for mode in ("default", "cleared"):
        other = run_distributed(_same_bytes_worker, 2, mode)
        for a, b in zip(base, other):
            assert torch.equal(a, b), mode


def _layer_state_worker(rank, world):
    import pickle

    import pycomm

    model = DDP(_layer_net())
    state = pycomm.register(model, "dgc", density=0.01, min_numel=1024)
    model(_inputs(0, rank)).pow(2).mean().backward()
    errors = {}
    for name, bad in [("density 0", {"0.weight": 0.0}), ("density > 1", {"0.weight": 1.5}),
                      ("bool", {"0.weight": True}), ("key", {(0, 0): 0.1}),
                      ("unknown name", {"5.weight": 0.1}), ("dense layer", {"0.bias": 0.1})]:
        try:
            state.set_layer_params(bad)
        except ValueError as e:
            errors[name] = str(e)
    assert state.layer_params == {}
    state.set_layer_params({"0.weight": 0.5, "4.weight": 0.05})
    state.observer = lambda *args: None
    saved = state.state_dict()
    restored = pycomm.hooks.DGCState(density=0.01, min_numel=1024).bind(model)
    restored.load_state_dict(saved)
    # Checkpoints that do not fit: the error names the first mismatch; strict=False loads what fits.
    mismatches = {}
    other_model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48))
    for what, bad, fresh in [
            ("old format", {"iter": 1, "buckets": {}}, pycomm.hooks.DGCState(density=0.01)),
            ("density", saved, pycomm.hooks.DGCState(density=0.02)),
            ("per-layer density of another model", saved, pycomm.hooks.DGCState(density=0.01)),
            ("shape", {**saved, "layer_params": {}, "params": {"2.weight": {"u": torch.zeros(32, 48)}}},
             pycomm.hooks.DGCState(density=0.01))]:
        try:
            fresh.bind(other_model).load_state_dict(bad)
        except CheckpointMismatch as e:
            mismatches[what] = str(e)
    lenient = pycomm.hooks.DGCState(density=0.01).bind(other_model)
    lenient.load_state_dict(saved, strict=False)
    unpickled = pickle.loads(pickle.dumps(state))  # the observer (a lambda) is dropped
    return {"errors": errors, "saved": saved["layer_params"], "restored": restored.layer_params,
            "mismatches": mismatches, "lenient": lenient.state_dict(), "saved_params": saved["params"],
            "unpickled_observer": unpickled.observer, "unpickled": unpickled.layer_params}


def test_layer_params_validation_and_state_dict():
    (r,) = run_distributed(_layer_state_worker, 1)
    assert set(r["errors"]) == {"density 0", "density > 1", "bool", "key", "unknown name", "dense layer"}, r["errors"]
    assert "not compressed" in r["errors"]["dense layer"] and "'5.weight'" in r["errors"]["unknown name"]
    assert r["saved"] == r["restored"] == r["unpickled"] == {"0.weight": 0.5, "4.weight": 0.05}
    assert r["unpickled_observer"] is None
    m = r["mismatches"]
    assert set(m) == {"old format", "density", "per-layer density of another model", "shape"}, m
    assert "not a pycomm state dict" in m["old format"] and "density=0.01" in m["density"]
    # The other model has no layer 4: the first mismatch is a name it does not have.
    assert "parameter '4." in m["per-layer density of another model"] and "(32, 48)" in m["shape"]
    assert "does not have" in m["per-layer density of another model"]
    # strict=False: the layers both models have (0.* and 2.*) keep their u and v; layer 4's are skipped.
    lenient = r["lenient"]
    assert lenient["layer_params"] == {"0.weight": 0.5}
    assert sorted(lenient["params"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name in sorted(lenient["params"]):
        for field in ("u", "v"):
            assert torch.equal(lenient["params"][name][field], r["saved_params"][name][field])


# ---- the sync-free path (CUDA's), forced on CPU -----------------------------------------------------
# The hook takes it where `_sync_free(buffer)` is true (CUDA tensors); these workers patch that
# function in their own spawned process, so the CPU suite runs the code that CUDA runs.

def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))  # 2 compressed, 2 dense layers


def _inf_at_first_weight(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g[0, 0] = float("inf")
    return g


def _sync_free_overflow_worker(rank, world, sync_free, nesterov):
    import pycomm
    from pycomm.hooks import dgc as dgc_module

    if sync_free:
        dgc_module._sync_free = lambda buffer: True
    net = _net()
    model = DDP(net)
    state = pycomm.register(model, "dgc", density=0.05, min_numel=1024, clip_norm=1.0, nesterov=nesterov)
    steps = []
    for step in range(5):
        handle = net[0].weight.register_hook(_inf_at_first_weight) if (step == 3 and rank == 1) else None
        model.zero_grad()
        model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step * 7 + rank))).pow(2).sum().backward()
        if handle is not None:
            handle.remove()
        sd = state.state_dict()
        steps.append({"grads": [p.grad.clone() for p in net.parameters()], "u": _flat(sd, "u"), "v": _flat(sd, "v")})
    return steps


@pytest.mark.parametrize("nesterov", [False, True])
def test_sync_free_overflow_keeps_the_accumulators_as_on_cpu(nesterov):
    """After an overflow step, the device-side selects leave u and v exactly as the CPU's host
    checks do: untouched on the rank with Inf, accumulated but unmasked on the other."""
    host = run_distributed(_sync_free_overflow_worker, 2, False, nesterov)
    free = run_distributed(_sync_free_overflow_worker, 2, True, nesterov)
    for rank in range(2):
        for step, (h, f) in enumerate(zip(host[rank], free[rank])):
            assert torch.equal(h["u"], f["u"]) and torch.equal(h["v"], f["v"]), (rank, step)
            assert torch.isfinite(f["u"]).all() and torch.isfinite(f["v"]).all(), (rank, step)
            w0, b0, w1, b1 = f["grads"]
            if step == 3:  # GradScaler sees the overflow either way: NaN here, the exact Inf on CPU
                assert torch.isnan(w0).all() and torch.isnan(w1).all()
                assert not torch.isfinite(h["grads"][0]).all()
                assert torch.equal(b0, h["grads"][1]) and torch.equal(b1, h["grads"][3])
            else:
                for a, b in zip(h["grads"], f["grads"]):
                    assert torch.equal(a, b), (rank, step)
    assert torch.equal(host[1][3]["u"], host[1][2]["u"]) and torch.equal(host[1][3]["v"], host[1][2]["v"])
    assert not torch.equal(host[0][3]["v"], host[0][2]["v"])


def _bad_index_worker(rank, world):
    import pycomm
    from pycomm.hooks import dgc as dgc_module

    dgc_module._sync_free = lambda buffer: True
    original_pack = dgc_module._pack
    corrupt = {"on": False}

    def pack(values, indices, flag, value_dtype):
        if corrupt["on"]:
            indices = indices.clone()
            indices[3] = 1 << 30
        return original_pack(values, indices, flag, value_dtype)

    dgc_module._pack = pack
    net = _net()
    model = DDP(net)
    state = pycomm.register(model, "dgc", density=0.05, min_numel=1024)
    out = {}
    for step in range(4):
        corrupt["on"] = step == 2 and rank == 1
        model.zero_grad()
        try:
            model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
        except RuntimeError as e:
            out["raised_at"], out["message"] = step, str(e)
            break
        if step == 2:
            out["grads"] = [p.grad.clone() for p in net.parameters()]
            out["pending"] = len(state._index_errors._pending)
    return out


def test_sync_free_bad_peer_index_raises_at_the_next_hook_call():
    for out in run_distributed(_bad_index_worker, 2):
        w0, b0, w1, b1 = out["grads"]
        assert torch.isnan(w0).all() and torch.isnan(w1).all() and torch.isfinite(b0).all()
        assert out["pending"] >= 1  # recorded in step 2, not raised there
        assert out["raised_at"] == 3
        assert "a peer's payload held index 1073741824 at position" in out["message"]
        assert "outside [0, " in out["message"] and "set to NaN" in out["message"]


def test_index_errors_are_read_back_later():
    from pycomm.hooks.dgc import DGCState, _IndexErrors

    errors = _IndexErrors()
    flags = torch.tensor([-1, -1])
    errors.record(flags, [("mine", torch.tensor([1, 2]), 10, "a"), ("theirs", torch.tensor([3]), 10, "b")])
    errors.raise_ready()  # nothing bad
    flags = torch.tensor([-1, 1])
    errors.record(flags, [("mine", torch.tensor([1, 2]), 10, "a"), ("theirs", torch.tensor([3, 12]), 10, "b")])
    with pytest.raises(RuntimeError, match=r"theirs held index 12 at position 1, outside \[0, 10\); b"):
        errors.raise_ready()
    errors.raise_ready()  # raised once
    state = DGCState()
    state._index_errors.record(torch.tensor([0]), [("mine", torch.tensor([-5]), 4, "a")])
    with pytest.raises(RuntimeError, match="mine held index -5"):
        state.raise_index_errors()
    state._index_errors.record(torch.tensor([-1]), [("mine", torch.tensor([1]), 4, "a")])
    assert "_index_errors" not in state.__getstate__()  # pending device checks are not pickled
    restored = DGCState.__new__(DGCState)
    restored.__setstate__(state.__getstate__())
    restored.raise_index_errors()


def test_pack_builds_no_tensor_from_host_data(monkeypatch):
    """torch.tensor([flag], device=cuda) was a blocking host-to-device copy per bucket and step."""
    from pycomm.hooks.dgc import _pack

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor() in the DGC hook's data path")

    values, indices = torch.tensor([1.5, -2.0]), torch.tensor([3, 9], dtype=torch.int32)
    monkeypatch.setattr(torch, "tensor", refuse)
    payload = _pack(values, indices, 1, torch.float16)
    device_flag = _pack(values, indices, torch.ones(1, dtype=torch.int32), torch.float16)
    monkeypatch.undo()
    assert torch.equal(payload, device_flag)
    assert payload[:4].view(torch.float16).tolist() == [1.5, -2.0]
    assert payload[4:12].view(torch.int32).tolist() == [3, 9] and payload[12:].view(torch.int32).item() == 1

"""The quantized all-reduce DDP hook: training on real data, exactness of the dense path, state."""

import io
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from char_task import train
from pycomm.hooks.param_state import CheckpointMismatch
from dist_utils import run_distributed

def _adamw(params, dense):
    return torch.optim.AdamW(params, lr=3e-3)


def _train_worker(rank, world, method, kwargs, steps):
    result = train(rank, method, kwargs, steps, _adamw)
    return {"eval_loss": result["eval_loss"], "bytes": sum(result["bytes_by_collective"].values()),
            "params": result["params"]}


@pytest.mark.parametrize("world", [2, 4])
def test_training_converges_like_allreduce(world):
    steps = 150
    dense = run_distributed(_train_worker, world, "allreduce", {}, steps)
    quant = run_distributed(_train_worker, world, "quant", {"bits": 4}, steps)
    for r in quant[1:]:
        assert torch.equal(r["params"], quant[0]["params"]), "ranks diverged"
    initial = 5.545  # ln(256)
    assert dense[0]["eval_loss"] < initial - 2.0
    # Stated tolerance: 4-bit quantization with error feedback ends within 0.1 nats of all-reduce.
    assert quant[0]["eval_loss"] <= dense[0]["eval_loss"] + 0.1, (quant[0]["eval_loss"], dense[0]["eval_loss"])
    # Measured bytes per step: the compressed model sends far less (biases go uncompressed).
    assert quant[0]["bytes"] <= dense[0]["bytes"] / 6, (quant[0]["bytes"], dense[0]["bytes"])


def _exactness_worker(rank, world):
    import pycomm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))  # 4096-weight compressed, rest dense
    model = DDP(net)
    state = pycomm.register(model, "quant", bits=2, start_iter=1, min_numel=1024)
    grads = []
    for step in range(3):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step * 10 + rank))
        model.zero_grad()
        model(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        # The exact mean, from an undistributed copy.
        local = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        local.load_state_dict(net.state_dict())
        local(x).pow(2).sum().backward()
        exact = [p.grad.clone() for p in local.parameters()]
        for g in exact:
            dist.all_reduce(g)
            g.div_(world)
        grads[-1] = (grads[-1], exact)
    return grads, state.iter


def test_dense_layers_exact_and_start_iter():
    results = run_distributed(_exactness_worker, 2)
    grads, iters = results[0]
    assert iters == 3
    for step, (got, exact) in enumerate(grads):
        w0, b0, w1, b1 = got
        ew0, eb0, ew1, eb1 = exact
        assert torch.allclose(b0, eb0, atol=1e-6) and torch.allclose(w1, ew1, atol=1e-6)  # dim <= 1 / small: dense
        assert torch.allclose(b1, eb1, atol=1e-6)
        if step < 1:
            assert torch.allclose(w0, ew0, atol=1e-6)  # before start_iter: plain all-reduce
        else:
            assert not torch.allclose(w0, ew0, atol=1e-6)  # 2-bit: visibly quantized
            assert torch.isfinite(w0).all()


def _checkpoint_worker(rank, world):
    import pycomm

    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(128, 64))
    state = pycomm.register(model, "quant", bits=4, start_iter=0)
    for step in range(3):
        model(torch.randn(4, 128, generator=torch.Generator().manual_seed(step + rank))).sum().backward()
    sd = state.state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # tensors, numbers, strings only
    restored = pycomm.hooks.QuantState(bits=4, start_iter=0).bind(model)
    restored.load_state_dict(loaded)
    clone = pickle.loads(pickle.dumps(state))
    # A checkpoint that does not fit names its first mismatch when loading strictly.
    errors = {}
    for what, bad, fresh in [
            ("bits", loaded, pycomm.hooks.QuantState(bits=2, start_iter=0)),
            ("method", {**loaded, "method": "dgc"}, pycomm.hooks.QuantState(bits=4, start_iter=0)),
            ("format", {**loaded, "format": 1}, pycomm.hooks.QuantState(bits=4, start_iter=0)),
            ("name", {**loaded, "params": {"linear.weight": loaded["params"]["weight"]}},
             pycomm.hooks.QuantState(bits=4, start_iter=0)),
            ("shape", {**loaded, "params": {"weight": {k: t[:, :64] for k, t in loaded["params"]["weight"].items()}}},
             pycomm.hooks.QuantState(bits=4, start_iter=0))]:
        with pytest.raises(CheckpointMismatch) as info:
            fresh.bind(model).load_state_dict(bad)
        errors[what] = str(info.value)
    # strict=False keeps this state's own settings and loads the residuals that fit.
    lenient = pycomm.hooks.QuantState(bits=2, start_iter=0).bind(model)
    lenient.load_state_dict({**loaded, "params": {**loaded["params"], "gone.weight": loaded["params"]["weight"]}},
                            strict=False)
    return sd, restored.state_dict(), clone.process_group, clone.iter, errors, lenient.bits, lenient.state_dict()


def test_state_dict_keeps_each_ranks_residuals():
    results = run_distributed(_checkpoint_worker, 2)
    sd0, sd1 = results[0][0], results[1][0]
    assert sd0["step"] == 3 and sd0["format"] == 2 and sd0["method"] == "quant" and sd0["config"]["bits"] == 4
    assert sorted(sd0["params"]) == ["weight"]  # the bias (dim 1) is not compressed: no residual
    w0, w1 = sd0["params"]["weight"]["worker"], sd1["params"]["weight"]["worker"]
    assert w0.shape == (64, 128) and sd0["params"]["weight"]["server"].shape == (64, 128)  # shaped like the parameter
    assert w0.abs().sum() > 0 and sd0["params"]["weight"]["server"].abs().sum() > 0
    assert not torch.equal(w0, w1), "each rank keeps its own residuals"
    for sd, restored, group, it, errors, lenient_bits, lenient in results:
        assert restored["step"] == sd["step"] == it and group is None
        # Before the first step the loaded residuals are held as loaded: the same tensors come back.
        for field in ("worker", "server"):
            assert torch.equal(restored["params"]["weight"][field], sd["params"]["weight"][field])
        assert "bits=4" in errors["bits"] and "bits=2" in errors["bits"]
        assert "'dgc'" in errors["method"] and "format 1" in errors["format"]
        assert "'linear.weight'" in errors["name"] and "(64, 64)" in errors["shape"]
        assert lenient_bits == 2 and lenient["config"]["bits"] == 2 and lenient["step"] == sd["step"]
        assert sorted(lenient["params"]) == ["weight"]
        assert torch.equal(lenient["params"]["weight"]["worker"], sd["params"]["weight"]["worker"])


def test_register_rejects_unknown_methods_and_options():
    import pycomm

    class FakeDDP:
        module = torch.nn.Linear(4, 2)

        def register_comm_hook(self, state, hook):
            self.hook = hook

    with pytest.raises(ValueError, match="unknown method"):
        pycomm.register(FakeDDP(), "nope")
    with pytest.raises(ValueError, match="bad options"):
        pycomm.register(FakeDDP(), "quant", bitz=4)
    with pytest.raises(ValueError, match="bits must be"):
        pycomm.register(FakeDDP(), "quant", bits=0)
    model = FakeDDP()
    state = pycomm.register(model, "quant", bits=3)
    assert state.bits == 3 and model.hook is pycomm.hooks.quantized_allreduce_hook
    assert list(state.parameter_names.params) == ["weight", "bias"]  # register binds the state to the names


# ---- per-layer bit widths (set_layer_params) and the observer ----

def _alternate_bits(state, hook):
    """Give the compressed layers of every bucket alternating 3 and 6 bits (by parameter name), from
    the first compressed step on (after DDP's rebuild, so each bucket holds its final layers)."""
    def wrapped(s, bucket):
        names = s.parameter_names.names_of(bucket.parameters())
        if s.iter >= s.start_iter - 1 and names[0] not in s.layer_params:
            params = dict(s.layer_params)
            compressed = [name for name, p in zip(names, bucket.parameters())
                          if p.dim() > 1 and p.numel() >= s.min_numel]
            for j, name in enumerate(compressed):
                params[name] = 3 if j % 2 == 0 else 6
            params.setdefault(names[0], 6)  # every bucket gets an entry, even without compressed layers
            s.set_layer_params(params)
        return hook(s, bucket)
    return wrapped


def _mixed_train_worker(rank, world, steps):
    from pycomm import ops

    # Buckets of 1 MB hold several compressed layers, so one bucket mixes 3 and 6 bits.
    result = train(rank, "quant", {"bits": 4}, steps, _adamw, wrap_hook=_alternate_bits, bucket_cap_mb=1.0)
    state = result["state"]
    expected, mixed_buckets = 0, 0
    for plan in state._plans.values():
        if plan.table is None:
            continue
        if plan.bits == 0:
            mixed_buckets += 1
            payload = ops.mixed_payload_bytes(plan.table, state.bucket_size)
            rows = plan.table.tolist()
            # Every layer's buckets carry that layer's bits; the rest is padding (empty rows).
            for name, offset, length, _ in plan.layers:
                bits = state.layer_params[name]
                mine = [r for r in rows if offset <= r[0] < offset + length and r[1] > 0]
                assert len(mine) == -(-length // state.bucket_size) and all(r[2] == bits for r in mine)
            padding = sum(ops.record_bytes(r[2], state.bucket_size) for r in rows if r[1] == 0)
            real = sum(-(-n // state.bucket_size) * ops.record_bytes(b, state.bucket_size)
                       for (_, _, n, _), b in zip(plan.layers, plan.layer_bits))
            assert payload == real + padding and padding <= real // 10
        else:
            payload = plan.table.shape[0] * ops.record_bytes(plan.bits, state.bucket_size)
        expected += 2 * (world - 1) * payload // world
    quant_bytes = sum(v for k, v in result["bytes_by_collective"].items() if k != "all_reduce")
    return {"eval_loss": result["eval_loss"], "params": result["params"], "expected": expected,
            "quant_bytes": quant_bytes, "mixed_buckets": mixed_buckets, "layer_params": state.layer_params}


@pytest.mark.parametrize("world", [4])  # W=2 with mixed bits: test_layer_params_in_one_bucket_observer_...
def test_mixed_layer_bits_converge_and_send_the_per_layer_bytes(world):
    steps = 150
    dense = run_distributed(_train_worker, world, "allreduce", {}, steps)
    mixed = run_distributed(_mixed_train_worker, world, steps)
    for r in mixed[1:]:
        assert torch.equal(r["params"], mixed[0]["params"]), "ranks diverged"
        assert r["layer_params"] == mixed[0]["layer_params"]
    assert mixed[0]["mixed_buckets"] >= 1, "no DDP bucket mixed two bit widths"
    for r in mixed:
        assert r["quant_bytes"] == r["expected"], (r["quant_bytes"], r["expected"])
    assert mixed[0]["eval_loss"] <= dense[0]["eval_loss"] + 0.1, (mixed[0]["eval_loss"], dense[0]["eval_loss"])


def _observer_worker(rank, world):
    import pycomm
    from pycomm.hooks import QuantState, quantized_allreduce_hook
    from pycomm.traffic import CollectiveByteCounter
    from quant_reference import bucket_units

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    model = DDP(net)
    state = QuantState(bits=4, start_iter=1, min_numel=1024, stochastic=True).bind(model)
    seen = []
    bucket_params = {}
    current = {}

    def observer(values, layers):
        index = current["index"]
        plan = state._plans[index]
        seen.append((index, values.clone(), layers, plan.worker_residual.clone()))

    def hook(s, bucket):
        current["index"] = bucket.index()
        bucket_params[bucket.index()] = [p for p in bucket.parameters()]
        if s.iter >= 1 and not s.layer_params:
            s.set_layer_params({"0.weight": 8, "1.weight": 2})  # (64, 64) and (32, 64)
        return quantized_allreduce_hook(s, bucket)

    model.register_comm_hook(state, hook)
    state.observer = observer
    out = []
    for step in range(4):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step * 10 + rank))
        model.zero_grad()
        seen.clear()
        residual_before = {i: p.worker_residual.clone() for i, p in state._plans.items()
                           if p.worker_residual is not None}
        with CollectiveByteCounter() as counter:
            model(x).pow(2).sum().backward()
        local = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
        local.load_state_dict(net.state_dict())
        local(x).pow(2).sum().backward()
        local_grads = {tuple(p.shape): p.grad.clone() for p in local.parameters()}
        exact = {k: g.clone() for k, g in local_grads.items()}
        for g in exact.values():
            dist.all_reduce(g)
            g.div_(world)
        got = {tuple(p.shape): p.grad.clone() for p in model.parameters()}
        out.append({"seen": [(i, v, layers, r, [tuple(p.shape) for p in bucket_params[i]],
                              state.parameter_names.names_of(bucket_params[i])) for i, v, layers, r in seen],
                    "residual_before": residual_before, "local": local_grads, "exact": exact, "got": got,
                    "bytes": dict(counter.bytes_by_collective),
                    "plans": {i: (p.bits, None if p.table is None else p.table.clone()) for i, p in state._plans.items()}})
    sd = state.state_dict()
    restored = QuantState(bits=4, start_iter=1, min_numel=1024, stochastic=True).bind(model)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    # Per-layer bits of a layer the model does not have: an error naming it when strict, skipped otherwise.
    unknown = {**sd, "layer_params": {**sd["layer_params"], "2.weight": 4}}
    try:
        QuantState(bits=4, start_iter=1, min_numel=1024, stochastic=True).bind(model).load_state_dict(unknown)
        strict_error = ""
    except ValueError as e:
        strict_error = str(e)
    lenient = QuantState(bits=4, start_iter=1, min_numel=1024, stochastic=True).bind(model)
    lenient.load_state_dict(unknown, strict=False)
    clone = pickle.loads(pickle.dumps(state))
    return out, sd, restored.layer_params, restored.state_dict(), (strict_error, lenient.layer_params), \
        clone.observer, clone.layer_params


def test_layer_params_in_one_bucket_observer_and_state_dict():
    from pycomm import ops

    world = 2
    results = run_distributed(_observer_worker, world)
    for step in range(4):
        grads = [r[0][step]["got"] for r in results]
        for k in grads[0]:
            assert torch.equal(grads[0][k], grads[1][k]), "ranks differ"
    for out, sd, restored_params, restored_sd, (strict_error, lenient_params), clone_observer, clone_params in results:
        assert [s["seen"] for s in out[:1]] == [[]]  # step 0: plain all-reduce, no observer
        for step in range(1, 4):
            rec = out[step]
            assert len(rec["seen"]) == 1
            index, values, layers, residual, shapes, names = rec["seen"][0]
            # values == buffer + worker residual, exactly: rebuild the buffer from the local grads.
            buffer = torch.cat([rec["local"][s].reshape(-1) for s in shapes])
            assert torch.equal(values, buffer + rec["residual_before"].get(index, torch.zeros_like(buffer))) \
                if step > 1 else torch.equal(values, buffer)
            assert sorted((name, shapes[names.index(name)], n) for name, _, n, _ in layers) == [
                ("0.weight", (64, 64), 4096), ("1.weight", (32, 64), 2048)]
            offsets = [sum(torch.Size(s).numel() for s in shapes[:names.index(name)]) for name, _, _, _ in layers]
            assert offsets == [o for _, o, _, _ in layers] and all(start == 0 for *_, start in layers)
            # One mixed table for the bucket: 8-bit and 2-bit layers inside it.
            bits, table = rec["plans"][index]
            assert bits == 0 and sorted({r[2] for r in table.tolist() if r[1] > 0}) == [2, 8]
            payload = ops.mixed_payload_bytes(table, 512)
            assert rec["bytes"]["all_to_all_single"] == (world - 1) * payload // world
            assert payload == 8 * ops.record_bytes(8, 512) + 4 * ops.record_bytes(2, 512) + sum(
                ops.record_bytes(r[2], 512) for r in table.tolist() if r[1] == 0)
            # The 8-bit layer is far more precise than the 2-bit one in the same bucket (the per-bits
            # error bounds themselves are checked in test_quantized_all_reduce.py).
            errors = {}
            for shape, b in [((64, 64), 8), ((32, 64), 2)]:
                err = (rec["got"][shape] - rec["exact"][shape]).abs().max().item()
                rng = (rec["exact"][shape].max() - rec["exact"][shape].min()).item()
                errors[b] = err / rng
            assert errors[8] < errors[2] / 8, errors
            assert all(torch.isfinite(g).all() for g in rec["got"].values())
        # Dense layers are exact.
        for shape in [(64,), (32,)]:
            assert torch.allclose(out[3]["got"][shape], out[3]["exact"][shape], atol=1e-6)
        assert sd["layer_params"] == {"0.weight": 8, "1.weight": 2}
        assert restored_params == sd["layer_params"] and restored_sd["layer_params"] == sd["layer_params"]
        assert "'2.weight'" in strict_error and lenient_params == sd["layer_params"]
        assert clone_observer is None and clone_params == sd["layer_params"]


def test_set_layer_params_validates():
    from pycomm.hooks import QuantState

    state = QuantState(bits=4).bind(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)))
    state.set_layer_params({"0.weight": 2, "1.weight": 8})
    assert state.layer_params == {"0.weight": 2, "1.weight": 8}
    view = state.layer_params
    view["0.bias"] = 1
    assert "0.bias" not in state.layer_params  # a copy
    state.set_layer_params(None)
    assert state.layer_params == {}
    for bad in [{"0.weight": 0}, {"0.weight": 9}, {"0.weight": 2.5}, {"0.weight": True}, {(0, 1): 2},
                {"2.weight": 2}, [1]]:
        with pytest.raises(ValueError):
            state.set_layer_params(bad)
    assert state.observer is None and state.layer_params == {}


def _dense_write_back_worker(rank, world):
    """The hook's dense layers: written on the caller's stream before it returns, with the future
    of the quantized collective returned as is (no callback), also across an overflow fallback."""
    from pycomm.hooks import QuantState
    from pycomm.hooks import quantized_allreduce as qa

    collective = []
    original = qa.quantized_all_reduce

    def recording(*args, **kwargs):
        fut = original(*args, **kwargs)
        collective.append(fut)
        return fut

    qa.quantized_all_reduce = recording  # a spawned process of its own: nothing to restore
    steps = []

    def hook(state, bucket):
        before = bucket.buffer().clone()
        calls = len(collective)
        fut = qa.quantized_allreduce_hook(state, bucket)
        at_return = bucket.buffer().clone()  # what the hook itself wrote, before DDP waits
        mean = before.clone()
        dist.all_reduce(mean)
        mean.div_(world)
        compressed = len(collective) > calls
        steps.append({"same_future": compressed and fut is collective[-1], "compressed": compressed,
                      "at_return": at_return, "after": fut.wait().clone(), "mean": mean,
                      "dense": list(state._plans[bucket.index()].dense) if compressed else []})
        return fut

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))  # 4096-weight compressed, rest dense
    model = DDP(net)
    model.register_comm_hook(QuantState(bits=2, start_iter=1, min_numel=1024).bind(model), hook)
    for step in range(4):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step * 10 + rank))
        handle = None
        if step == 3 and rank == 1:  # overflow on one rank: the whole bucket goes uncompressed
            handle = net[0].weight.register_hook(lambda g: g.index_put((torch.tensor([0]), torch.tensor([0])),
                                                                       torch.tensor(float("inf"))))
        model.zero_grad()
        model(x).pow(2).sum().backward()
        if handle is not None:
            handle.remove()
    return steps


def test_dense_layers_written_before_return_and_future_is_the_collectives():
    per_rank = run_distributed(_dense_write_back_worker, 2)
    steps = per_rank[0]
    assert [s["compressed"] for s in steps] == [False, True, True, True]
    for i, s in enumerate(steps):
        for other in per_rank[1:]:
            assert torch.equal(other[i]["after"], s["after"]), f"step {i}: ranks differ"
        if not s["compressed"]:
            continue
        assert all(r[i]["same_future"] for r in per_rank), f"step {i}: the hook wrapped the collective's future"
        assert s["dense"], "the model has dense layers"
        for r in per_rank:
            t = r[i]
            for o, n in t["dense"]:
                # The exact average, already in the bucket when the hook returned.
                assert torch.equal(t["at_return"][o:o + n], t["mean"][o:o + n]), (i, o, n)
                assert torch.equal(t["after"][o:o + n], t["mean"][o:o + n]), (i, o, n)
    overflow = steps[3]
    assert torch.isinf(overflow["after"]).any()
    assert torch.equal(overflow["after"], overflow["mean"])  # the uncompressed fallback, dense layers included
    assert not torch.equal(steps[2]["after"], steps[2]["mean"])  # 2-bit: the compressed layer visibly quantized

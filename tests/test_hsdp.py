"""pycomm.hsdp: FSDP2 on the shard dimension of a 2 x 2 mesh (W = 4, Gloo, CPU), quantized replica
all-reduce in FSDP2's all-reduce hook.

One spawn runs every scenario (plain FSDP2 over the whole world, native uncompressed HSDP, and HSDP
with pycomm on the replicate dimension, from the same seed and data); the tests check the results.
Mesh: ranks [[0, 1], [2, 3]]: shard groups {0, 1} and {2, 3}, replicate groups {0, 2} and {1, 3}.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed

WORLD = 4
BUCKET = 512
SHARD_GROUPS = ((0, 1), (2, 3))
REPLICATE_GROUPS = ((0, 2), (1, 3))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(127, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh, reshard_after_forward=False)  # no all-gather inside backward
    return model


class _Recorder:
    """Wraps a module's all-reduce hook and keeps a copy of each shard it is given."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __call__(self, reduce_output):
        self.log.append(reduce_output.clone())
        self.inner(reduce_output)


def _batch(rank, step, nan=False):
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(16, 127, generator=g), torch.randn(16, 128, generator=g)
    if nan:
        x[0, 0] = math.nan
    return x, y


def _run(rank, mesh, bits=None, steps=1, nan_rank=None, micro_batches=1):
    """mesh: 1-D world mesh (plain FSDP2), the 2-D mesh (native HSDP), or, with ``bits``, the 2-D
    mesh whose shard dimension goes to fully_shard and replicate dimension to pycomm."""
    from pycomm.hsdp import compress_replicas
    from pycomm.traffic import CollectiveByteCounter

    model = _model()
    state, log = None, []
    if bits is not None:
        _shard(model, mesh["shard"])
        state = compress_replicas(model, mesh["replicate"], bits=bits, bucket_size=BUCKET, seed=5)
        modules = dict(model.named_modules())
        for name, hook in state.hooks.items():
            modules[name].set_all_reduce_hook(_Recorder(hook, log))
    else:
        _shard(model, mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = {}
    for step in range(steps):
        for micro in range(micro_batches):
            if micro_batches > 1:
                model.set_requires_all_reduce(micro == micro_batches - 1)
            x, y = _batch(rank, step * micro_batches + micro, nan=nan_rank == rank)
            loss = torch.nn.functional.mse_loss(model(x), y)
            with CollectiveByteCounter() as counter:
                loss.backward()
            if step == 0 and micro == 0:
                out["bytes_by_group"] = dict(counter.bytes_by_group)
                out["calls"] = dict(counter.calls)
        if step == 0:
            out["hooked"] = [t.clone() for t in log]
            out["grads"] = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
            out["local_grads"] = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    out["full"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if state is not None:
        out["state"] = state.state_dict()
        out["layouts"] = {name: hook.layout for name, hook in state.hooks.items()}
    return out, model, state


def _direct_nan(rank, state):
    """Call module '0's hook with a shard holding one NaN on rank 0, then a finite one."""
    hook = state.hooks["0"]
    numel = sum(n for _, n in hook.layout)
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(numel, generator=g)
    if rank == 0:
        x[7] = math.nan
    original = x.clone()
    hook(x)
    residual_finite = all(bool(torch.isfinite(t).all()) for entry in state.state_dict()["params"].values()
                          for t in entry.values())
    y = torch.randn(numel, generator=g)
    hook(y)
    return {"original": original, "out": x, "residual_finite": residual_finite, "next_finite": bool(y.isfinite().all())}


def _errors(rank, mesh2, world_mesh):
    from pycomm.hsdp import compress_replicas, init_hsdp_mesh

    errors = {}

    def expect(key, fn):
        try:
            fn()
        except ValueError as e:
            errors[key] = str(e)
        else:
            errors[key] = None

    expect("not_divisible", lambda: init_hsdp_mesh("cpu", shard_size=3))
    sharded = _shard(_model(), mesh2["shard"])
    expect("shard_group_as_replicate", lambda: compress_replicas(sharded, mesh2["shard"]))
    expect("world_as_replicate", lambda: compress_replicas(sharded, dist.group.WORLD))
    crossed = [dist.new_group([0, 3]), dist.new_group([1, 2])]  # every rank creates both
    expect("crossed_replicas", lambda: compress_replicas(sharded, crossed[0] if rank in (0, 3) else crossed[1]))
    expect("native_2d", lambda: compress_replicas(_shard(_model(), mesh2), mesh2["replicate"]))
    expect("not_sharded", lambda: compress_replicas(_model(), mesh2["replicate"]))
    expect("bits", lambda: compress_replicas(sharded, mesh2["replicate"], bits=9))
    state = compress_replicas(sharded, mesh2["replicate"], bits=4)
    saved = state.state_dict()
    expect("load_other_bits", lambda: state.load_state_dict({**saved, "config": {**saved["config"], "bits": 3}}))
    expect("load_other_layout", lambda: state.load_state_dict({**saved, "shard_rank": 1 - saved["shard_rank"]}))
    return errors


def _worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from pycomm.hsdp import init_hsdp_mesh

    mesh2 = init_hsdp_mesh("cpu", shard_size=2)
    world_mesh = init_device_mesh("cpu", (world,))
    results = {"world": _run(rank, world_mesh)[0], "native": _run(rank, mesh2)[0], "q8": _run(rank, mesh2, bits=8)[0]}
    q4, _, q4_state = _run(rank, mesh2, bits=4, steps=3)
    results["q4x3"] = q4
    results["direct_nan"] = _direct_nan(rank, q4_state)
    # The checkpoint round-trips: what is loaded is what is saved next.
    q4_state.load_state_dict(q4["state"])
    results["reloaded"] = q4_state.state_dict()
    for hook in q4_state.hooks.values():  # move the loaded residuals into the working buffers and out again
        q4_state._plan_for(hook, torch.empty(sum(n for _, n in hook.layout)))
    results["replanned"] = q4_state.state_dict()
    # pycomm.checkpoint's helpers: every rank's state in one list, each rank loads its own entry back;
    # strict=False drops what does not fit (an unknown parameter, other bits) and keeps the rest.
    from pycomm.checkpoint import gather_state_dicts, load_rank_state_dict

    everyone = gather_state_dicts(q4_state)
    lenient = {**q4["state"], "config": {**q4["state"]["config"], "bits": 3},
               "params": {**q4["state"]["params"], "9.weight": {"worker": torch.ones(3)}}}
    q4_state.load_state_dict(lenient, strict=False)
    results["lenient"] = q4_state.state_dict()
    load_rank_state_dict(q4_state, everyone)
    results["helpers"] = q4_state.state_dict()
    results["nan"] = _run(rank, mesh2, bits=4, nan_rank=3)[0]
    results["acc_world"] = _run(rank, world_mesh, micro_batches=2)[0]
    results["acc_q8"] = _run(rank, mesh2, bits=8, micro_batches=2)[0]
    results["errors"] = _errors(rank, mesh2, world_mesh)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, WORLD, timeout=300)


def _quant_tolerance(runs, key, bits):
    """Per module: 2 * (largest max - min of any rank's pre-hook shard) / (2^bits - 1). Each element
    is quantized twice (the peers' chunk, then the reduced chunk), each time within one unit of its
    bucket, whose range is at most the shard's."""
    ranges = [float(t.max() - t.min()) for r in runs for t in r[key]["hooked"]]
    return 2 * max(ranges) / (2**bits - 1)


def test_native_hsdp_reference_matches_plain_fsdp_over_the_world(runs):
    for r in runs:
        for name, g in r["world"]["grads"].items():
            torch.testing.assert_close(r["native"]["grads"][name], g, rtol=1e-5, atol=1e-7)


def test_8bit_gradient_is_the_world_average_within_the_quantization_bound(runs):
    tol = _quant_tolerance(runs, "q8", 8)
    max_diff = 0.0
    for r in runs:
        for name, g in r["world"]["grads"].items():
            diff = float((r["q8"]["grads"][name] - g).abs().max())
            assert diff <= tol + 1e-6, (name, diff, tol)
            max_diff = max(max_diff, diff)
    assert max_diff > 0  # it was quantized
    # Replicas end with the same gradient, bit for bit.
    for name in runs[0]["q8"]["grads"]:
        for r in runs[1:]:
            assert torch.equal(r["q8"]["grads"][name], runs[0]["q8"]["grads"][name]), name


def test_replicate_dimension_compressed_shard_dimension_uncompressed(runs):
    for rank, r in enumerate(runs):
        q = r["q4x3"]
        shard_group = SHARD_GROUPS[rank // 2]
        replicate_group = REPLICATE_GROUPS[rank % 2]
        shard_bytes = sum(t.numel() * t.element_size() for t in q["hooked"])
        assert len(q["hooked"]) == 2  # one call per FSDP module with parameters
        # Inside the shard group: FSDP's own reduce-scatter, uncompressed ((S-1)/S of an input of S shards).
        assert q["bytes_by_group"][shard_group] == shard_bytes
        # Across replicas: at most 1/6 of a ring all-reduce of the same shard (2 (R-1)/R of its bytes).
        sent = q["bytes_by_group"][replicate_group]
        assert 0 < sent <= shard_bytes / 6, (sent, shard_bytes)
        assert q["calls"].get("all_reduce", 0) == 0
        assert set(q["bytes_by_group"]) == {shard_group, replicate_group}


def test_shards_identical_across_replicas_after_training(runs):
    for name, p in runs[0]["q4x3"]["full"].items():
        assert torch.isfinite(p).all()
        for r in runs[1:]:
            assert torch.equal(r["q4x3"]["full"][name], p), name
        # and training moved them
        assert not torch.equal(p, _model().state_dict()[name])


def test_state_is_keyed_by_parameter_name_and_round_trips(runs):
    for rank, r in enumerate(runs):
        state = r["q4x3"]["state"]
        assert state["shard_rank"] == rank % 2 and state["replicate_size"] == 2 and state["shard_size"] == 2
        assert state["calls"] == {"0": 3, "2": 3}
        sizes = {n: k for layout in r["q4x3"]["layouts"].values() for n, k in layout}
        assert set(state["params"]) == {"0.weight", "0.bias", "2.weight", "2.bias"} == set(sizes)
        for name, entry in state["params"].items():
            assert entry["worker"].shape == (sizes[name],) and entry["server"].shape == (sizes[name],)
            # error feedback kept something (a shard inside this rank's own chunk has only a server residual)
            assert entry["worker"].abs().sum() + entry["server"].abs().sum() > 0, name
        assert r["lenient"]["config"]["bits"] == 4 and "9.weight" not in r["lenient"]["params"]
        for again in (r["reloaded"], r["replanned"], r["lenient"], r["helpers"]):
            assert again["calls"] == state["calls"] and again["config"] == state["config"]
            for name, entry in state["params"].items():
                for key in ("worker", "server"):
                    assert torch.equal(again["params"][name][key], entry[key]), (name, key)


def test_nan_on_one_rank_reaches_every_rank(runs):
    for r in runs:
        for name, g in r["nan"]["local_grads"].items():
            assert not torch.isfinite(g).all(), name


def test_direct_nan_reaches_the_replica_and_leaves_residuals_finite(runs):
    for group in REPLICATE_GROUPS:
        a, b = (runs[i]["direct_nan"] for i in group)
        exact = (a["original"] + b["original"]) / 2
        for d in (a, b):
            assert d["residual_finite"] and d["next_finite"]
            if 0 in group:
                assert math.isnan(float(d["out"][7]))
                finite = torch.ones_like(exact, dtype=torch.bool)
                finite[7] = False
                # the fallback is the exact uncompressed average
                assert torch.equal(d["out"][finite], exact[finite])
            else:
                assert torch.isfinite(d["out"]).all()
        assert torch.equal(a["out"].nan_to_num(), b["out"].nan_to_num())


def test_requires_all_reduce_false_accumulates_like_native_hsdp(runs):
    tol = 2 * _quant_tolerance(runs, "acc_q8", 8)
    for rank, r in enumerate(runs):
        # the first micro-batch is reduce-scattered but sends nothing across replicas
        assert set(r["acc_q8"]["bytes_by_group"]) == {SHARD_GROUPS[rank // 2]}
        for name, g in r["acc_world"]["grads"].items():
            got = r["acc_q8"]["grads"][name]
            assert float((got - g).abs().max()) <= tol + 1e-6, name
            assert torch.equal(got, runs[0]["acc_q8"]["grads"][name]), name


def test_bad_input_raises_clear_value_errors(runs):
    for rank, r in enumerate(runs):
        e = r["errors"]
        assert "positive divisor of the world size (4)" in e["not_divisible"]
        assert "share exactly this rank" in e["shard_group_as_replicate"]
        assert "product must be the world size (4)" in e["world_as_replicate"]
        assert "disagree" in e["crossed_replicas"] and "shard ranks [" in e["crossed_replicas"]
        assert "native HSDP" in e["native_2d"]
        assert "no FSDPModule" in e["not_sharded"]
        assert "bits must be an integer in [1, 8]" in e["bits"]
        assert "bits=3" in e["load_other_bits"]
        assert "shard_rank: checkpoint" in e["load_other_layout"]

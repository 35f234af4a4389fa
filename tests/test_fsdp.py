"""pycomm.fsdp: the quantized reduce-scatter under FSDP2's fully_shard, on 2 and 4 Gloo ranks.

One spawn per world size runs every scenario (direct calls of the comm, then FSDP2 runs with the
default and the quantized reduce-scatter from the same seed and data); the tests check the results.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from quant_reference import bucket_units

BUCKET = 512
SHARD_SIZES = (1000, 512, 3)  # a partial last bucket, exactly one bucket, fewer elements than W


def _direct_input(rank, world, shard, dtype, case):
    g = torch.Generator().manual_seed(1000 * case + rank)
    return (torch.randn(world * shard, generator=g) * (rank + 1)).to(dtype)


def _direct_cases():
    """(bits, shard numel, dtype, op name, PREMUL_SUM factor or None, rank and index of a NaN or None)."""
    cases = [(8, s, torch.float32, "AVG", None, None) for s in SHARD_SIZES]
    cases += [(4, 1000, torch.float32, "PREMUL_SUM", 1 / 3, None), (8, 1000, torch.bfloat16, "SUM", None, None),
              (8, 1000, torch.float16, "SUM", None, None),
              (3, 1000, torch.float32, "AVG", None, (1, "own")), (3, 1000, torch.float32, "SUM", None, (0, "peer"))]
    return cases


def _op(name, factor):
    return dist.ReduceOp.PREMUL_SUM(factor) if name == "PREMUL_SUM" else getattr(dist.ReduceOp, name)


def _direct(rank, world):
    from pycomm.fsdp import QuantizedReduceScatter

    results = []
    for case, (bits, shard, dtype, op_name, factor, nan) in enumerate(_direct_cases()):
        x = _direct_input(rank, world, shard, dtype, case)
        if nan is not None and nan[0] == rank:
            # "own": inside this rank's own (unquantized) chunk; "peer": inside the next rank's chunk.
            owner = rank if nan[1] == "own" else (rank + 1) % world
            x[owner * shard + 5] = math.nan
        # The NaN cases run with error feedback: the residual must not keep the NaN.
        comm = QuantizedReduceScatter(bits=bits, bucket_size=BUCKET, seed=3, error_feedback=nan is not None)
        out = comm.allocate((shard,), dtype=dtype, device=x.device)
        # async_op, which FSDP never passes, returns a completed Work.
        work = comm(output_tensor=out, input_tensor=x.clone(), group=dist.group.WORLD, op=_op(op_name, factor),
                    async_op=case == 0)
        assert (work is None) == (case != 0)
        if work is not None:
            work.wait()
        exact = torch.empty_like(out)
        dist.reduce_scatter_single(exact, x.clone(), op=dist.ReduceOp.SUM)
        results.append({"out": out, "exact_sum": exact, "fallbacks": comm.uncompressed_calls,
                        "residual": comm.residual})
    return results


class _Recorder:
    """Wraps a reduce-scatter comm and keeps each call's input and output."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        entry = {"input": input_tensor.clone()}
        result = self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op)
        entry["output"] = output_tensor.clone()
        self.log.append(entry)
        return result


def _fsdp_run(rank, world, bits, nan_rank=None, steps=1, reduce_dtype=None, reshard=True, error_feedback=False):
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    from pycomm.fsdp import compress
    from pycomm.traffic import CollectiveByteCounter

    torch.manual_seed(0)
    # Sizes chosen so that every shard is (nearly) whole buckets: 127*256+256 and 128*256+128 elements.
    model = torch.nn.Sequential(torch.nn.Linear(127, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    options = {"mp_policy": MixedPrecisionPolicy(reduce_dtype=reduce_dtype), "reshard_after_forward": reshard}
    fully_shard(model[0], **options)
    fully_shard(model[2], **options)
    fully_shard(model, **options)
    state = compress(model, bits=bits, bucket_size=BUCKET, seed=11, error_feedback=error_feedback) if bits else None
    log = []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            inner = state.comms[name] if state else DefaultReduceScatter()
            module.set_custom_reduce_scatter(_Recorder(inner, log))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    bytes_by_collective = None
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(16, 127, generator=g), torch.randn(16, 128, generator=g)
        if nan_rank == rank:
            x[0, 0] = math.nan
        loss = torch.nn.functional.mse_loss(model(x), y)
        with CollectiveByteCounter() as counter:
            loss.backward()
        if step == 0:
            bytes_by_collective = dict(counter.bytes_by_collective)
            grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"log": log if steps == 1 else None, "bytes": bytes_by_collective, "grads": grads, "full": full,
            "fallbacks": state.uncompressed_calls if state else 0, "modules": len(state.comms) if state else 0,
            "state": state.state_dict() if state else None}


def _worker(rank, world):
    return {"direct": _direct(rank, world),
            "plain": _fsdp_run(rank, world, 0),
            "q8": _fsdp_run(rank, world, 8),
            "q4": _fsdp_run(rank, world, 4),
            "q8bf16": _fsdp_run(rank, world, 8, reduce_dtype=torch.bfloat16, reshard=False),
            "nan": _fsdp_run(rank, world, 4, nan_rank=world - 1),
            "plain3": _fsdp_run(rank, world, 0, steps=3),
            "q4x3": _fsdp_run(rank, world, 4, steps=3),
            "q2efx3": _fsdp_run(rank, world, 2, steps=3, error_feedback=True)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def runs(request):
    world = request.param
    return world, run_distributed(_worker, world, timeout=300)


def _scale(op_name, factor, world):
    return {"SUM": 1.0, "AVG": 1.0 / world, "PREMUL_SUM": factor}[op_name]


def test_direct_calls_within_quantization_bound(runs):
    world, results = runs
    for case, (bits, shard, dtype, op_name, factor, nan) in enumerate(_direct_cases()):
        if nan is not None:
            continue
        xs = [_direct_input(r, world, shard, dtype, case).double().view(world, shard) for r in range(world)]
        scale = _scale(op_name, factor, world)
        for rank in range(world):
            exact = sum(x[rank] for x in xs) * scale
            # Each peer's contribution is off by < one unit of its bucket (stochastic rounding).
            bound = sum(bucket_units(xs[k][rank], bits, BUCKET) for k in range(world) if k != rank) * abs(scale)
            # The owner's chunk and the sum stay in full precision; bfloat16 rounds the output once.
            slack = 1e-5 + exact.abs() * {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 0}[dtype]
            out = results[rank]["direct"][case]["out"]
            assert out.dtype == dtype
            err = (out.double() - exact).abs()
            assert (err <= bound + slack).all(), (case, rank, (err - bound - slack).max())
            assert results[rank]["direct"][case]["fallbacks"] == 0


def test_direct_nan_falls_back_to_exact_uncompressed_on_every_rank(runs):
    world, results = runs
    for case, (bits, shard, dtype, op_name, factor, nan) in enumerate(_direct_cases()):
        if nan is None:
            continue
        for rank in range(world):
            r = results[rank]["direct"][case]
            # Every rank fell back (else the collectives would not have matched), and the result is
            # exactly the uncompressed reduce-scatter: the NaN lands where it belongs, the rest is exact.
            assert r["fallbacks"] == 1
            assert torch.equal(r["residual"], torch.zeros(world * shard))
            expected = r["exact_sum"] * _scale(op_name, factor, world)
            torch.testing.assert_close(r["out"], expected, rtol=0, atol=0, equal_nan=True)
        assert any(torch.isnan(results[rank]["direct"][case]["out"]).any() for rank in range(world))


def test_fsdp_8bit_shards_within_bound_of_uncompressed(runs):
    world, results = runs
    plain, q8 = [results[r]["plain"]["log"] for r in range(world)], [results[r]["q8"]["log"] for r in range(world)]
    assert len(q8[0]) == 2  # once per sharded module with parameters
    for call in range(len(q8[0])):
        inputs = [q8[r][call]["input"].double() for r in range(world)]
        for r in range(world):
            # Same seed and data: FSDP hands both runs the same reduce-scatter input.
            assert torch.equal(plain[r][call]["input"], q8[r][call]["input"])
        shard = inputs[0].numel() // world
        chunks = [x.view(world, shard) for x in inputs]
        for rank in range(world):
            bound = sum(bucket_units(chunks[k][rank], 8, BUCKET) for k in range(world) if k != rank) / world
            err = (q8[rank][call]["output"].double() - plain[rank][call]["output"].double()).abs()
            assert (err <= bound + 1e-6).all(), (call, rank, (err - bound).max())
            assert err.max() > 0  # it really was quantized
    for rank in range(world):  # and the gradients FSDP stored are those shards
        for name, grad in results[rank]["q8"]["grads"].items():
            ref = results[rank]["plain"]["grads"][name]
            assert grad.shape == ref.shape and (grad - ref).abs().max() < 0.05 * ref.abs().max() + 1e-6


def test_fsdp_bfloat16_reduce_dtype_without_reshard(runs):
    world, results = runs
    for rank in range(world):
        log = results[rank]["q8bf16"]["log"]
        assert len(log) == 2 and all(e["input"].dtype == e["output"].dtype == torch.bfloat16 for e in log)
        for name, grad in results[rank]["q8bf16"]["grads"].items():
            ref = results[rank]["plain"]["grads"][name]
            assert grad.dtype == torch.float32  # FSDP casts the shard back to the parameter dtype
            assert (grad - ref).abs().max() < 0.05 * ref.abs().max() + 1e-6, (rank, name)


def test_fsdp_4bit_bytes_at_most_one_seventh(runs):
    world, results = runs
    for rank in range(world):
        plain, q4 = results[rank]["plain"]["bytes"], results[rank]["q4"]["bytes"]
        shards = [e["output"].numel() for e in results[rank]["q4"]["log"]]
        record = 8 + BUCKET * 4 // 8
        # Uncompressed: (W-1)/W of each W*S-element fp32 input. Quantized: per peer, ceil(S/512)
        # records of 8 + 256 bytes plus the one-byte non-finite flag.
        assert plain["reduce_scatter_single"] == sum((world - 1) * s * 4 for s in shards)
        assert q4["all_to_all_single"] == sum((world - 1) * (-(-s // BUCKET) * record + 1) for s in shards)
        assert "reduce_scatter_single" not in q4
        assert q4["all_to_all_single"] * 7 <= plain["reduce_scatter_single"]


def test_fsdp_nan_on_one_rank_reaches_every_rank(runs):
    world, results = runs
    for rank in range(world):
        r = results[rank]["nan"]
        # The root holds no parameters of its own, so only the two Linear modules reduce-scatter.
        assert r["modules"] == 3 and r["fallbacks"] == len(r["log"]) == 2
        for name, grad in r["grads"].items():
            assert torch.isnan(grad).any(), (rank, name)


def test_fsdp_params_identical_across_ranks_and_close_to_uncompressed(runs):
    world, results = runs
    for name, p0 in results[0]["q4x3"]["full"].items():
        for rank in range(1, world):
            assert torch.equal(results[rank]["q4x3"]["full"][name], p0), (rank, name)
        ref = results[0]["plain3"]["full"][name]
        start = results[0]["plain"]["full"][name]  # one step of plain: a scale for the update size
        assert (p0 - ref).abs().max() < 0.5 * (ref - start).abs().max() + 1e-3, name



def test_fsdp_error_feedback_state_by_parameter_name(runs):
    world, results = runs
    for rank in range(world):
        state = results[rank]["q2efx3"]["state"]
        assert state["world_size"] == world and state["config"]["error_feedback"] is True
        assert state["calls"] == {"": 0, "0": 3, "2": 3}  # the root has no parameters of its own
        # One residual per parameter, [W, *padded shard shape]: rows ceil(rows / W) of the parameter.
        shapes = {"0.weight": (256, 127), "0.bias": (256,), "2.weight": (128, 256), "2.bias": (128,)}
        assert set(state["params"]) == set(shapes)
        for name, shape in shapes.items():
            residual = state["params"][name]["residual"]
            assert residual.shape == (world, -(-shape[0] // world), *shape[1:])
            assert torch.isfinite(residual).all() and residual.abs().max() > 0
            assert torch.equal(residual[rank], torch.zeros_like(residual[rank]))  # own shard: never quantized
        for name, p0 in results[0]["q2efx3"]["full"].items():
            assert torch.equal(results[rank]["q2efx3"]["full"][name], p0)


def _feedback(rank, world, error_feedback, repeats):
    from pycomm.fsdp import QuantizedReduceScatter

    comm = QuantizedReduceScatter(bits=2, bucket_size=BUCKET, stochastic=False, error_feedback=error_feedback)
    x = _direct_input(rank, world, 700, torch.float32, 99)
    total = torch.zeros(700, dtype=torch.float64)
    for _ in range(repeats):
        out = torch.empty(700)
        comm(output_tensor=out, input_tensor=x.clone(), group=dist.group.WORLD, op=dist.ReduceOp.SUM)
        total += out.double()
    restored = QuantizedReduceScatter(bits=2, bucket_size=BUCKET, stochastic=False, error_feedback=error_feedback)
    restored.load_state_dict(comm.state_dict())
    return {"mean": total / repeats, "state": comm.state_dict(), "restored": restored.state_dict()}


def test_error_feedback_cancels_the_rounding_bias_over_steps():
    world, repeats = 2, 16
    with_ef = run_distributed(_feedback, world, True, repeats)
    without = run_distributed(_feedback, world, False, repeats)
    xs = [_direct_input(r, world, 700, torch.float32, 99).double().view(world, 700) for r in range(world)]
    for rank in range(world):
        exact = sum(x[rank] for x in xs)
        unit = sum(bucket_units(xs[k][rank], 2, BUCKET) for k in range(world) if k != rank)
        # Round to nearest at 2 bits without feedback: the same error every step (up to unit / 2).
        # With feedback the errors telescope: the mean is off by at most one residual / repeats.
        err_ef = (with_ef[rank]["mean"] - exact).abs()
        err_plain = (without[rank]["mean"] - exact).abs()
        assert (err_ef <= unit / repeats + 1e-5).all()
        assert err_plain.max() > 4 * err_ef.max()
        state = with_ef[rank]["state"]
        # A comm used on its own (no parameter layout) keeps one residual named "" over the [W, S] input.
        assert state["calls"] == repeats and state["residuals"][""].shape == (world, 700)
        assert torch.equal(state["residuals"][""][rank], torch.zeros(700))  # own chunk: never quantized
        assert torch.equal(with_ef[rank]["restored"]["residuals"][""], state["residuals"][""])
        assert without[rank]["state"]["residuals"] == {}

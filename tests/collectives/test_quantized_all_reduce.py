"""pycomm.distributed.quantized_all_reduce on 2 and 4 Gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed


def _inputs(rank, n, dtype, seed=0):
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed * 100 + rank)) * (rank + 1)).to(dtype)


def _reduce_worker(rank, world, cases):
    import pycomm
    from pycomm.traffic import CollectiveByteCounter

    results = []
    for n, bits, dtype, op_name, stochastic in cases:
        y = _inputs(rank, n, dtype)
        op = getattr(dist.ReduceOp, op_name)
        with CollectiveByteCounter() as counter:
            pycomm.distributed.quantized_all_reduce(y, bits=bits, bucket_size=512, op=op, stochastic=stochastic,
                                                    seed=7)
        results.append({"y": y, "bytes": counter.bytes_sent, "calls": dict(counter.calls)})
    return results


def _error_bound(world, n, bits, dtype, op_name):
    """Per-element bound: each peer's contribution is off by < one unit of its bucket
    (stochastic) and the re-quantized sum by < one unit of the sum's bucket."""
    from quant_reference import bucket_units

    xs = [_inputs(r, n, dtype).double() for r in range(world)]
    exact = torch.stack(xs).sum(0)
    units = sum(bucket_units(x, bits, 512) for x in xs)
    # The reduced chunk's range is at most the exact sum's range plus the phase-1 errors.
    sum_units = bucket_units(exact, bits, 512) + 2 * units / (2**bits - 1)
    bound = units + sum_units
    if op_name == "AVG":
        exact, bound = exact / world, bound / world
    return exact, bound


@pytest.mark.parametrize("world", [2, 4])
def test_within_error_bound_and_bit_identical(world):
    cases = [(10001, 4, torch.float32, "SUM", True), (3000, 2, torch.float16, "AVG", True),
             (517, 8, torch.bfloat16, "SUM", False), (5, 3, torch.float32, "AVG", True)]
    per_rank = run_distributed(_reduce_worker, world, cases)
    for i, (n, bits, dtype, op_name, stochastic) in enumerate(cases):
        ys = [r[i]["y"] for r in per_rank]
        for y in ys[1:]:
            assert torch.equal(y, ys[0]), "ranks differ"
        exact, bound = _error_bound(world, n, bits, dtype, op_name)
        out_eps = {torch.float32: 0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
        err = (ys[0].double() - exact).abs()
        assert torch.all(err <= bound * 1.0001 + exact.abs() * out_eps + 1e-5), (n, bits, dtype)


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_sent_at_4_bits_are_under_a_seventh_of_fp32(world):
    n = 1 << 20
    quant = run_distributed(_reduce_worker, world, [(n, 4, torch.float32, "SUM", True)])
    fp32_ring = 2 * (world - 1) / world * n * 4
    for (r,) in quant:
        assert r["calls"] == {"all_to_all_single": 1, "all_gather_single": 1} or \
            r["calls"] == {"all_to_all_single": 1, "all_gather_into_tensor": 1}
        assert r["bytes"] <= fp32_ring / 7, (r["bytes"], fp32_ring)


def _overflow_worker(rank, world):
    import pycomm

    x = torch.randn(4096)
    if rank == 1:
        x[1000] = float("inf")
    y = x.clone()
    pycomm.distributed.quantized_all_reduce(y, bits=4)
    plain = x.clone()
    dist.all_reduce(plain)
    return y, plain


def test_nonfinite_falls_back_to_uncompressed():
    results = run_distributed(_overflow_worker, 4)
    for y, plain in results:
        assert torch.equal(y, plain)  # the uncompressed result, inf included
        assert torch.isinf(y[1000])


def _async_worker(rank, world):
    import pycomm

    x = torch.ones(2000) * (rank + 1)
    fut = pycomm.distributed.quantized_all_reduce(x, bits=8, async_op=True, op=dist.ReduceOp.AVG)
    out = fut.wait()
    return out is x, x


def test_async_returns_future_of_the_tensor():
    for same, x in run_distributed(_async_worker, 2):
        assert same
        assert torch.allclose(x, torch.full((2000,), 1.5), atol=1e-6)


def test_rejects_bad_arguments():
    import pycomm

    with pytest.raises(ValueError, match="op must be"):
        pycomm.distributed.quantized_all_reduce(torch.zeros(8), op=dist.ReduceOp.MAX)
    with pytest.raises(ValueError, match="contiguous"):
        pycomm.distributed.quantized_all_reduce(torch.zeros(8, 8).t())


# ---- mixed bit widths in one call (a 4-column bucket table) ----

MIXED_SEGMENTS = [(0, 3000), (3100, 517), (3700, 1024), (5000, 7), (5100, 2200)]
MIXED_BITS = [2, 8, 4, 1, 6]
MIXED_NUMEL = 7400


def _mixed_worker(rank, world, cases):
    import pycomm
    from pycomm import ops
    from pycomm.traffic import CollectiveByteCounter

    table = ops.bucket_table(MIXED_SEGMENTS, 512, pad_to_multiple=world, bits=MIXED_BITS)
    per_chunk = table.shape[0] // world
    results = []
    for dtype, op_name, stochastic in cases:
        y = _inputs(rank, MIXED_NUMEL, dtype, seed=3)
        before = y.clone()
        worker = torch.zeros(MIXED_NUMEL)
        server = torch.zeros(per_chunk * 512)
        with CollectiveByteCounter() as counter:
            pycomm.distributed.quantized_all_reduce(y, bits=4, bucket_size=512, op=getattr(dist.ReduceOp, op_name),
                                                    stochastic=stochastic, seed=7, bucket_table=table,
                                                    worker_residual=worker, server_residual=server)
        results.append({"y": y, "before": before, "bytes": counter.bytes_sent, "calls": dict(counter.calls),
                        "payload": ops.mixed_payload_bytes(table, 512), "worker": worker, "server": server})
    return results


MIXED_CASES = [(torch.float32, "SUM", True), (torch.float16, "AVG", True), (torch.bfloat16, "SUM", False)]


@pytest.mark.parametrize("world", [2, 4])
def test_mixed_bits_bit_identical_within_each_layers_bound_and_bytes_counted(world):
    results = run_distributed(_mixed_worker, world, MIXED_CASES)
    for i, (dtype, op_name, _) in enumerate(MIXED_CASES):
        _check_mixed_case(world, [r[i] for r in results], dtype, op_name)


def _check_mixed_case(world, per_rank, dtype, op_name):
    from quant_reference import bucket_units

    covered = torch.zeros(MIXED_NUMEL, dtype=torch.bool)
    for o, n in MIXED_SEGMENTS:
        covered[o:o + n] = True
    ys = [r["y"] for r in per_rank]
    for y in ys[1:]:
        assert torch.equal(y[covered], ys[0][covered]), "ranks differ"
    xs = [r["before"].double() for r in per_rank]
    exact = torch.stack(xs).sum(0)
    out_eps = {torch.float32: 0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for (o, n), bits in zip(MIXED_SEGMENTS, MIXED_BITS):
        units = sum(bucket_units(x[o:o + n], bits, 512) for x in xs)
        bound = units + bucket_units(exact[o:o + n], bits, 512) + 2 * units / (2**bits - 1)
        ref = exact[o:o + n]
        if op_name == "AVG":
            ref, bound = ref / world, bound / world
        err = (ys[0][o:o + n].double() - ref).abs()
        assert torch.all(err <= bound * 1.0001 + ref.abs() * out_eps + 1e-5), (o, n, bits)
        if bits == 8:  # the 8-bit layer really got 8 bits: far inside what 2 bits could reach
            assert err.max() < (exact[o:o + n].max() - exact[o:o + n].min()) / 40
    # Elements outside the table are left untouched.
    for r in per_rank:
        assert torch.equal(r["y"][~covered], r["before"][~covered])
        assert r["worker"][covered].abs().sum() > 0 and r["server"].abs().sum() > 0
    # Bytes: (W-1)/W of the mixed payload in the all-to-all, the same in the all-gather.
    for r in per_rank:
        assert r["payload"] % world == 0
        assert r["bytes"] == 2 * (world - 1) * r["payload"] // world, (r["bytes"], r["payload"])
        assert sum(r["calls"].values()) == 2 and r["calls"].get("all_to_all_single") == 1
    # Smaller than the uniform 8-bit table, larger than the uniform 1-bit one.
    from pycomm import ops
    eight = ops.bucket_table(MIXED_SEGMENTS, 512, pad_to_multiple=world).shape[0] * ops.record_bytes(8, 512)
    assert per_rank[0]["payload"] < eight


def _mixed_overflow_worker(rank, world):
    import pycomm
    from pycomm import ops

    table = ops.bucket_table(MIXED_SEGMENTS, 512, pad_to_multiple=world, bits=MIXED_BITS)
    x = _inputs(rank, MIXED_NUMEL, torch.float32)
    if rank == 1:
        x[3200] = float("inf")
    y = x.clone()
    pycomm.distributed.quantized_all_reduce(y, bucket_table=table)
    plain = x.clone()
    dist.all_reduce(plain)
    return y, plain


def test_mixed_nonfinite_falls_back_to_uncompressed():
    for y, plain in run_distributed(_mixed_overflow_worker, 2):
        assert torch.equal(y, plain) and torch.isinf(y[3200])


def test_mixed_table_must_be_balanced_for_the_world():
    import pycomm
    from pycomm import ops

    table = ops.bucket_table(MIXED_SEGMENTS, 512, pad_to_multiple=1, bits=MIXED_BITS)
    with pytest.raises(ValueError, match="pad_to_multiple=3"):
        pycomm.distributed.mixed_chunk_bytes(table, 512, 3)
    rows = table.shape[0]
    if rows % 2:
        table = ops.bucket_table(MIXED_SEGMENTS + [(9000, 1)], 512, pad_to_multiple=1, bits=MIXED_BITS + [1])
    with pytest.raises(ValueError, match="differ in bytes"):
        pycomm.distributed.mixed_chunk_bytes(table, 512, 2)
    balanced = ops.bucket_table(MIXED_SEGMENTS, 512, pad_to_multiple=2, bits=MIXED_BITS)
    assert pycomm.distributed.mixed_chunk_bytes(balanced, 512, 2) * 2 == ops.mixed_payload_bytes(balanced, 512)

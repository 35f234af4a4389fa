"""Hostile arguments to the raw ops: bounds checks that cannot overflow, payloads without
uninitialised bytes, ranges wider than float32 that still decode finite, bools that are not ints.

Each test here reproduces a defect of issue 11 (it failed before the fix)."""

import math

import numpy as np
import pytest
import torch

from pycomm import ops
from cuda_support import requires_cuda
from quant_reference import quantize_reference

INT64_MAX = 2**63 - 1
B = 512
BITS = 4


def _zero_payloads(sources: int, buckets: int, bits: int = BITS, bucket: int = B) -> torch.Tensor:
    return torch.zeros(sources, buckets, 8 + bucket * bits // 8, dtype=torch.uint8)


def _table_view(rows: torch.Tensor, before: int) -> torch.Tensor:
    """`rows` stored after `before` other rows of one larger tensor: a table whose memory has
    readable neighbours, so an index that wraps around reads them instead of crashing."""
    cols = rows.shape[1]
    storage = torch.cat([torch.full((before, cols), 7, dtype=torch.int64), rows])
    return storage[before:]


# ---- 1. offset + length overflow in the bounds checks ----

def test_dequantize_sum_rejects_init_bucket_begin_that_overflows():
    # The issue's example: init_bucket_begin + num_buckets wraps to a small number, and the
    # rows stored before the table were read as bucket rows.
    init = torch.arange(4 * B, dtype=torch.float32)
    table = _table_view(torch.tensor([[0, B], [B, B], [2 * B, B], [3 * B, B]]), before=2)
    zero = _zero_payloads(1, 2)
    with pytest.raises(RuntimeError, match="outside bucket_table"):
        torch.ops.pycomm.dequantize_sum(zero, init, table, 2**63 - 2, BITS, B)
    with pytest.raises(RuntimeError, match="outside bucket_table"):
        torch.ops.pycomm.dequantize_sum(zero, init, table, INT64_MAX, BITS, B)
    # In range still works: rows 2, 3 of the table.
    out = torch.ops.pycomm.dequantize_sum(zero, init, table, 2, BITS, B)
    assert torch.equal(out, init[2 * B:])
    with pytest.raises(RuntimeError, match="outside bucket_table"):
        torch.ops.pycomm.dequantize_sum(zero, init, table, 3, BITS, B)


def test_dequantize_sum_without_table_rejects_bucket_positions_that_overflow():
    # Without a table, bucket k reads init[(begin + k) * B, ...): that product wrapped to 0
    # and bucket 0 of init was added to buckets far past its end.
    init = torch.arange(2 * B, dtype=torch.float32) + 1
    zero = _zero_payloads(1, 2)
    with pytest.raises(RuntimeError, match="init_bucket_begin"):
        torch.ops.pycomm.dequantize_sum(zero, init, None, 2**62, BITS, B)
    # Buckets past the end of init (padding chunks) are legitimate and read nothing.
    assert torch.equal(torch.ops.pycomm.dequantize_sum(zero, init, None, 5, BITS, B), torch.zeros(2 * B))


def _mixed_table(bits, bucket=B, lengths=None):
    segments, offset = [], 0
    for i, _ in enumerate(bits):
        length = bucket if lengths is None else lengths[i]
        segments.append((offset, length))
        offset += length
    return ops.bucket_table(segments, bucket, bits=list(bits))


def test_quantize_mixed_rejects_chunk_row_begin_that_overflows():
    table = _table_view(_mixed_table([4, 4, 4, 4]), before=2)
    x = torch.randn(2 * B)
    for begin in (2**63 - 2, 2**63 - 1, 2**62):
        with pytest.raises(RuntimeError, match="outside bucket_table"):
            torch.ops.pycomm.quantize(x, None, table, 2, 0, B, False, 0, 0, 0, None, begin)
    ok = torch.ops.pycomm.quantize(x, None, table, 2, 0, B, False, 0, 0, 0, None, 2)
    assert ok.numel() == 2 * (8 + B * 4 // 8)


def test_mixed_decoders_reject_rows_that_overflow():
    table = _table_view(_mixed_table([2, 2]), before=2)
    record = 8 + B * 2 // 8
    with pytest.raises(RuntimeError, match="outside bucket_table"):
        torch.ops.pycomm.dequantize_sum(torch.zeros(1, record, dtype=torch.uint8), None, table, INT64_MAX, 0, B)


def test_philox_ops_near_the_end_of_the_index_space():
    # offset + numel == 2^63 - 1 is allowed; the last tile's end (base + 128) overflowed,
    # so nothing was written there (and philox_dot summed nothing).
    n = 5
    offset = INT64_MAX - n
    z = ops.philox_normal(n, seed=3, offset=offset)
    assert torch.isfinite(z).all() and z.abs().sum() > 0
    t = torch.zeros(n)
    ops.philox_axpy_(t, seed=3, alpha=1.0, offset=offset)
    assert torch.equal(t, z)
    copy = ops.philox_perturbed_copy(torch.zeros(n), seed=3, alpha=1.0, offset=offset)
    assert torch.equal(copy[0] if isinstance(copy, (list, tuple)) else copy, z)
    dot = ops.philox_dot(torch.ones(n), seed=3, offset=offset)
    assert float(dot) == pytest.approx(float(z.double().sum()), rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        ops.philox_normal(n + 1, seed=3, offset=offset + 1)


@requires_cuda
def test_cuda_philox_ops_near_the_end_of_the_index_space():
    n = 4100  # more than one dot chunk, ending at 2^63 - 1
    offset = INT64_MAX - n
    z = ops.philox_normal(n, seed=3, offset=offset)
    t = torch.zeros(n, device="cuda")
    ops.philox_axpy_(t, seed=3, alpha=1.0, offset=offset)
    assert torch.equal(t.cpu(), z)
    x = torch.randn(n)
    assert torch.equal(ops.philox_dot(x.cuda(), seed=3, offset=offset).cpu(), ops.philox_dot(x, seed=3, offset=offset))


# ---- 2. no uninitialised bytes in a payload ----

def test_quantize_mixed_rejects_host_table_that_differs_from_cpu_table():
    table = _mixed_table([8, 8])
    host = _mixed_table([1, 1])
    x = torch.zeros(2 * B)
    with pytest.raises(RuntimeError, match="host_table"):
        torch.ops.pycomm.quantize(x, None, table, -1, 0, B, False, 0, 0, 0, host)
    with pytest.raises(RuntimeError, match="host_table"):
        torch.ops.pycomm.dequantize_into(torch.zeros(2 * (8 + B), dtype=torch.uint8), torch.zeros(2 * B), table, 0, B,
                                         host)
    with pytest.raises(RuntimeError, match="host_table"):
        torch.ops.pycomm.dequantize_sum(torch.zeros(1, 2 * (8 + B // 8), dtype=torch.uint8), None, table, 0, 0, B,
                                        host)
    # An equal copy is accepted and changes nothing.
    same = torch.ops.pycomm.quantize(x, None, table, -1, 0, B, False, 0, 0, 0, table.clone())
    assert torch.equal(same, torch.ops.pycomm.quantize(x, None, table, -1, 0, B, False, 0, 0, 0))


# ---- 3. ranges wider than float32: finite input, finite output ----

FLOAT_MAX = {torch.float32: torch.finfo(torch.float32).max, torch.float16: torch.finfo(torch.float16).max,
             torch.bfloat16: torch.finfo(torch.bfloat16).max}


def _extreme_inputs(dtype):
    big = FLOAT_MAX[dtype]
    gen = torch.Generator().manual_seed(5)
    cases = [
        torch.tensor([-1e38, 3e38] * 4) if dtype != torch.float16 else torch.tensor([-1e4, 3e4] * 4),
        torch.tensor([-big, big] * 4),
        torch.tensor([big, big, -big, 0.0, 1.0, -1.0, big / 3, -big / 7]),
        torch.tensor([big] * 8),
        torch.tensor([-big] * 7 + [big]),
        torch.cat([torch.tensor([-big, big]), (torch.rand(62, generator=gen) * 2 - 1) * big]),
        torch.cat([torch.tensor([-big, big]), torch.randn(62, generator=gen)]),
        torch.tensor([0.0, big] * 4),
        torch.tensor([-big, 0.0] * 4),
    ]
    return [c.to(dtype) for c in cases]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_largest_finite_values_decode_finite_within_the_bound(dtype, stochastic):
    for case, x in enumerate(_extreme_inputs(dtype)):
        x64 = x.double()
        bucket = 8 if x.numel() == 8 else 64
        for bits in range(1, 9):
            for seed in range(3 if stochastic else 1):
                residual = torch.zeros(x.numel())
                q = ops.quantize_with_error_feedback(x, residual, bits=bits, bucket_size=bucket, stochastic=stochastic,
                                                     seed=seed)
                y = ops.dequantize(q)
                y64 = y.double()
                where = f"case {case}, bits={bits}, seed={seed}"
                assert torch.isfinite(y).all(), f"{where}: {y.tolist()}"
                assert torch.isfinite(residual).all(), where
                # The true range, which may exceed float32.
                lo = x64.view(-1, bucket).amin(1, keepdim=True)
                hi = x64.view(-1, bucket).amax(1, keepdim=True)
                unit = ((hi - lo) / (2**bits - 1)).expand(-1, bucket).reshape(-1)
                rounding = torch.maximum(x64.abs(), y64.abs()) * 2.0**-22  # float32 steps, output dtype
                rounding += torch.maximum(x64.abs(), y64.abs()) * {torch.float32: 0, torch.float16: 2.0**-11,
                                                                  torch.bfloat16: 2.0**-8}[dtype]
                bound = unit * (1.0 if stochastic else 0.5) * (1 + 1e-5) + rounding
                err = (x64 - y64).abs()
                assert torch.all(err <= bound), f"{where}: x={x64.tolist()} y={y64.tolist()}"
                # Decoded values stay inside the bucket's range (no level past the top), up to
                # float32 rounding of the unit and of the decoding, relative to the range.
                slack = rounding + ((hi - lo) * 2.0**-20).expand(-1, bucket).reshape(-1)
                assert torch.all(y64 >= lo.expand(-1, bucket).reshape(-1) - slack), where
                assert torch.all(y64 <= hi.expand(-1, bucket).reshape(-1) + slack), where
                # The residual (x minus the float32 decoded value, before rounding to dtype)
                # obeys the same bound.
                assert torch.all(residual.double().abs() <= bound - rounding + x64.abs() * 2.0**-22), where
                if dtype == torch.float32:
                    assert torch.equal(residual, x - y), where


def test_wide_range_issue_example():
    x = torch.tensor([-1e38, 3e38] * 4)
    for bits in range(1, 9):
        y = ops.dequantize(ops.quantize(x, bits=bits, bucket_size=8, stochastic=False))
        assert torch.isfinite(y).all(), bits
        assert y[1] > 2e38 and y[0] < -0.9e38, (bits, y.tolist())


def test_wide_range_sums_stay_finite():
    x = torch.tensor([-3e38, 3e38] * 4)
    payloads = torch.stack([ops.quantize(x, bits=b, bucket_size=8, stochastic=False).payload for b in [3]] * 2)
    out = torch.ops.pycomm.dequantize_sum(payloads[:1], None, None, 0, 3, 8)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), x.double(), rtol=1e-6)


def test_wide_range_matches_reference_bytes():
    gen = torch.Generator().manual_seed(9)
    x = torch.cat([torch.tensor([-3.4e38, 3.4e38]), (torch.rand(126, generator=gen) * 2 - 1) * 3.4e38])
    for bits in range(1, 9):
        for stochastic in (False, True):
            q = ops.quantize(x, bits=bits, bucket_size=64, stochastic=stochastic, seed=4)
            assert np.array_equal(q.payload.numpy(), quantize_reference(x, bits, 64, stochastic, 4)), (bits, stochastic)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_wide_ranges_match_cpu(dtype):
    for x in _extreme_inputs(dtype):
        bucket = 8 if x.numel() == 8 else 64
        for bits in range(1, 9):
            for stochastic in (False, True):
                cpu = ops.quantize(x, bits=bits, bucket_size=bucket, stochastic=stochastic, seed=2)
                gpu = ops.quantize(x.cuda(), bits=bits, bucket_size=bucket, stochastic=stochastic, seed=2)
                assert torch.equal(cpu.payload, gpu.payload.cpu()), (bits, stochastic)
                assert torch.equal(ops.dequantize(cpu), ops.dequantize(gpu).cpu()), (bits, stochastic)
                sums = torch.ops.pycomm.dequantize_sum(gpu.payload.unsqueeze(0), None, None, 0, bits, bucket)
                assert torch.equal(sums.cpu(), torch.ops.pycomm.dequantize_sum(cpu.payload.unsqueeze(0), None, None, 0,
                                                                               bits, bucket))


@requires_cuda
def test_cuda_payload_sized_from_a_differing_host_table_holds_no_stale_bytes():
    table = _mixed_table([8, 8]).cuda()
    host = _mixed_table([1, 1])
    size = 2 * (8 + B // 8)
    # Leave 0xFF bytes in the allocator's cache where the payload will be placed.
    junk = torch.full((size,), 255, dtype=torch.uint8, device="cuda")
    del junk
    payload = torch.ops.pycomm.quantize(torch.zeros(2 * B, device="cuda"), None, table, -1, 0, B, False, 0, 0, 0, host)
    assert payload.numel() == size
    assert torch.all(payload.cpu() == 0)


# ---- 7a. bools are not ints ----

def test_bools_are_rejected_where_ints_are_expected():
    x = torch.randn(64)
    with pytest.raises(ValueError, match="bits"):
        ops.quantize(x, bits=True)
    with pytest.raises(ValueError, match="bucket_size"):
        ops.quantize(x, bits=4, bucket_size=True)
    with pytest.raises(ValueError, match="bits"):
        ops.record_bytes(True, 8)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        ops.bucket_table([(0, 10)], 8, pad_to_multiple=True)
    with pytest.raises(ValueError, match="segment"):
        ops.bucket_table([(True, 10)], 8)
    with pytest.raises(ValueError, match="segment"):
        ops.segment_table([(0, True)])
    with pytest.raises(ValueError, match="counts"):
        ops.segment_table([(0, 4)], counts=[True])
    with pytest.raises(ValueError, match="numel"):
        ops.densify(torch.ones(1), torch.zeros(1, dtype=torch.int64), True)

"""Quantization ops on CPU: exact bytes against a reference, error bounds, bias, fused variants, errors."""

import math

import numpy as np
import pytest
import torch

import pycomm
from pycomm import ops
from quant_reference import bucket_units, quantize_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 513, 4099, (1 << 18) + 5]
OUTPUT_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("stochastic", [False, True])
def test_error_bound_against_float64(dtype, bits, stochastic):
    for n in SIZES:
        x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3 + 1).to(dtype)
        q = ops.quantize(x, bits=bits, bucket_size=512, stochastic=stochastic, seed=n)
        y = ops.dequantize(q)
        assert y.dtype == dtype and y.shape == x.shape
        x64, y64 = x.double(), y.double()
        unit = bucket_units(x64, bits, 512)
        bound = unit * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-6 + torch.maximum(x64.abs(), y64.abs()) * OUTPUT_EPS[dtype] * 2
        assert torch.all((x64 - y64).abs() <= bound), f"n={n}"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("stochastic", [False, True])
def test_bytes_match_reference_format(bits, stochastic):
    for n, bucket in [(1, 8), (7, 8), (1000, 64), (5000, 512), (3000, 1024)]:
        x = torch.randn(n, generator=torch.Generator().manual_seed(bits * 1000 + n)).to(torch.float32)
        q = ops.quantize(x, bits=bits, bucket_size=bucket, stochastic=stochastic, seed=11)
        assert np.array_equal(q.payload.numpy(), quantize_reference(x, bits, bucket, stochastic, 11))
        assert q.nbytes == -(-n // bucket) * (8 + bucket * bits // 8)


def test_stochastic_rounding_is_unbiased():
    # Each element rounds to a neighbouring level with probability proportional to
    # its distance: E[dequantize] = x. Over S seeds, the per-element mean error has
    # standard deviation <= unit / (2 sqrt(S)); we allow 5 sigma per element and
    # 5 sigma for the mean over all elements (which would expose a global bias).
    S, n, bits = 400, 2048, 2
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(n, dtype=torch.float64)
    for seed in range(S):
        acc += ops.dequantize(ops.quantize(x, bits=bits, bucket_size=512, stochastic=True, seed=seed)).double()
    err = acc / S - x.double()
    unit = bucket_units(x.double(), bits, 512)
    sigma = unit / (2 * math.sqrt(S))
    assert torch.all(err.abs() <= 5 * sigma + 1e-7)
    assert abs(err.mean().item()) <= 5 * sigma.mean().item() / math.sqrt(n)
    # Round-to-nearest is biased on the same data: the check above has teeth.
    near = ops.dequantize(ops.quantize(x, bits=bits, stochastic=False)).double() - x.double()
    assert (near.abs() > 5 * sigma).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_feedback_is_exact(dtype):
    x = torch.randn(5003, generator=torch.Generator().manual_seed(1)).to(dtype)
    residual = torch.randn(5003, generator=torch.Generator().manual_seed(2)) * 0.01
    before = residual.clone()
    q = ops.quantize_with_error_feedback(x, residual, bits=3, bucket_size=256, seed=4)
    compensated = x.float() + before
    decoded = ops.dequantize(ops.QuantizedTensor(q.payload, 3, 256, 5003, torch.float32, torch.Size([5003])))
    assert torch.equal(residual, compensated - decoded)
    # Same bytes as quantizing the compensated tensor directly.
    assert torch.equal(q.payload, ops.quantize(compensated, bits=3, bucket_size=256, seed=4).payload)


def test_dequantize_sum_matches_sequential_sum():
    xs = [torch.randn(3001, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    qs = [ops.quantize(x, bits=4, seed=s) for s, x in enumerate(xs)]
    init = torch.randn(3001).to(torch.bfloat16)
    expected = init.float().clone()
    for q in qs:
        expected += ops.dequantize(q)
    assert torch.equal(ops.dequantize_sum(qs, init=init), expected)
    plain = torch.zeros(3001)
    for q in qs:
        plain += ops.dequantize(q)
    assert torch.equal(ops.dequantize_sum(qs), plain)


def test_shapes_dtypes_and_tiny_inputs():
    for shape in [(0,), (1,), (3, 5, 7), (2, 0, 3)]:
        x = torch.randn(shape).half()
        y = ops.dequantize(ops.quantize(x, bits=8))
        assert y.shape == x.shape and y.dtype == x.dtype
    const = torch.full((100,), 2.5)
    assert torch.equal(ops.dequantize(ops.quantize(const, bits=1)), const)
    non_contiguous = torch.randn(64, 64).t()
    y = ops.dequantize(ops.quantize(non_contiguous, bits=8, stochastic=False))
    assert (y - non_contiguous).abs().max() < 0.05


def test_nonfinite_bucket_decodes_as_nan_and_keeps_residual():
    x = torch.randn(2048)
    x[700] = float("inf")
    residual = torch.full((2048,), 0.25)
    q = ops.quantize_with_error_feedback(x, residual, bits=4, bucket_size=512)
    y = ops.dequantize(q)
    assert torch.isnan(y[512:1024]).all()
    assert torch.isfinite(y[:512]).all() and torch.isfinite(y[1024:]).all()
    assert torch.all(residual[512:1024] == 0.25)
    assert not torch.all(residual[:512] == 0.25)


def test_huge_range_does_not_overflow():
    x = torch.tensor([-3e38, 3e38] * 8)
    y = ops.dequantize(ops.quantize(x, bits=1, bucket_size=8, stochastic=False))
    assert torch.isfinite(y).all()


def test_bucket_table_layout():
    buf = torch.randn(3000)
    segments = [(0, 1000), (1500, 1100)]
    table = ops.bucket_table(segments, 512, pad_to_multiple=4)
    assert table.shape == (8, 2) and table[:5].tolist() == [[0, 512], [512, 488], [1500, 512], [2012, 512],
                                                            [2524, 76]]
    payload = torch.ops.pycomm.quantize(buf, None, table, -1, 8, 512, False, 0, 0, 0)
    out = torch.zeros(3000)
    torch.ops.pycomm.dequantize_into(payload, out, table, 8, 512)
    covered = torch.zeros(3000, dtype=torch.bool)
    covered[0:1000] = True
    covered[1500:2600] = True
    assert torch.all(out[~covered] == 0)
    assert (out[covered] - buf[covered]).abs().max() < 0.05
    with pytest.raises(ValueError, match="overlaps"):
        ops.bucket_table([(0, 10), (5, 10)], 8)


def test_skip_range_writes_zero_records():
    x = torch.randn(4096) + 5
    payload = torch.ops.pycomm.quantize(x, None, None, 8, 4, 512, True, 0, 2, 5)
    assert payload[2:5].eq(0).all() and payload[:2].ne(0).any() and payload[5:].ne(0).any()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.quantize(torch.arange(10), bits=4)
    with pytest.raises(ValueError, match="bits must be"):
        ops.quantize(x, bits=0)
    with pytest.raises(ValueError, match="bits must be"):
        ops.quantize(x, bits=9)
    with pytest.raises(ValueError, match="bucket_size"):
        ops.quantize(x, bucket_size=12)
    with pytest.raises(ValueError, match="residual"):
        ops.quantize_with_error_feedback(x, torch.zeros(99))
    q = ops.quantize(x, bits=4, bucket_size=64)
    with pytest.raises(ValueError, match="payload must be uint8"):
        ops.QuantizedTensor(q.payload[:, :-1], 4, 64, 100, torch.float32, torch.Size([100]))
    with pytest.raises(ValueError, match="fewer than numel"):
        ops.QuantizedTensor(q.payload[:1], 4, 64, 100, torch.float32, torch.Size([100]))
    # The raw ops reject the same things with TORCH_CHECK.
    with pytest.raises(RuntimeError, match="records of"):
        torch.ops.pycomm.dequantize_into(q.payload[:, :-1].contiguous(), torch.empty(100), None, 4, 64)
    with pytest.raises(RuntimeError, match="bits must be in"):
        torch.ops.pycomm.quantize(x, None, None, -1, 12, 64, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="cannot hold"):
        torch.ops.pycomm.quantize(x, None, None, 1, 4, 64, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="must be uint8"):
        torch.ops.pycomm.dequantize_sum(torch.zeros(2, 2, 40), None, None, 0, 4, 64)


def test_compression_ratio():
    q = ops.quantize(torch.randn(1 << 20), bits=4, bucket_size=512)
    assert (1 << 20) * 4 / q.nbytes == pytest.approx(32 * 512 / (4 * 512 + 64))


def test_signed_zero_extremes_are_canonical():
    # +0 and -0 compare equal, so the header must not depend on which one a scan keeps.
    a = torch.tensor([-0.0, 0.0, 1.0, 2.0, 0.5, 0.25, 0.0, -0.0])
    b = torch.tensor([0.0, -0.0, 1.0, 2.0, 0.5, 0.25, -0.0, 0.0])
    qa = ops.quantize(a, bits=4, bucket_size=8, stochastic=False)
    qb = ops.quantize(b, bits=4, bucket_size=8, stochastic=False)
    assert torch.equal(qa.payload, qb.payload)
    assert qa.meta[0, 0].item() == 0.0 and not torch.signbit(qa.meta[0, 0])


# ---- mixed bit widths: 4-column (offset, length, bits, byte_offset) tables ----

from quant_reference import mixed_reference  # noqa: E402

Q = torch.ops.pycomm


def _mixed_case(seed, n_segments=6, bucket=64, max_len=300, gap=True):
    """Random non-overlapping segments (some empty, some tiny or odd) with random bits."""
    gen = torch.Generator().manual_seed(seed)
    segments, offset = [], 0
    for _ in range(n_segments):
        offset += int(torch.randint(0, 20, (1,), generator=gen)) if gap else 0
        length = int(torch.randint(0, max_len, (1,), generator=gen))
        segments.append((offset, length))
        offset += length
    bits = [int(b) for b in torch.randint(1, 9, (n_segments,), generator=gen)]
    return segments, bits, offset + 5


def _check_table_structure(table, bucket, chunks):
    rows = table.tolist()
    expected = 0
    for offset, length, bits, byte_offset in rows:
        assert 1 <= bits <= 8 and 0 <= length <= bucket and byte_offset == expected
        expected += 8 + bucket * bits // 8
    assert ops.mixed_payload_bytes(table, bucket) == expected
    assert len(rows) % chunks == 0
    per = len(rows) // chunks
    chunk_bytes = [sum(8 + bucket * r[2] // 8 for r in rows[c * per:(c + 1) * per]) for c in range(chunks)]
    assert len(set(chunk_bytes)) <= 1, chunk_bytes


@pytest.mark.parametrize("chunks", [1, 2, 3, 4])
def test_mixed_table_covers_every_bucket_once_with_balanced_chunks(chunks):
    for seed in range(20):
        segments, bits, _ = _mixed_case(seed, n_segments=8, bucket=64)
        table = ops.bucket_table(segments, 64, pad_to_multiple=chunks, bits=bits)
        _check_table_structure(table, 64, chunks)
        real = sorted(tuple(r[:3]) for r in table.tolist() if r[1] > 0)
        expected = sorted((start, min(64, o + n - start), b) for (o, n), b in zip(segments, bits)
                          for start in range(o, o + n, 64))
        assert real == expected
        # Padding stays small: at most 2 rows per chunk beyond what equal row counts need.
        per = table.shape[0] // chunks
        assert per <= -(-len(expected) // chunks) + 2
        if chunks == 1:
            assert [tuple(r[:3]) for r in table.tolist()] == [
                (start, min(64, o + n - start), b) for (o, n), b in sorted(zip(segments, bits))
                for start in range(o, o + n, 64)]


def test_mixed_table_uniform_bits_costs_the_same_as_the_two_column_table():
    segments = [(0, 1000), (1500, 1100), (3000, 77)]
    two = ops.bucket_table(segments, 512, pad_to_multiple=4)
    mixed = ops.bucket_table(segments, 512, pad_to_multiple=4, bits=[4, 4, 4])
    assert mixed.shape[0] == two.shape[0]
    assert ops.mixed_payload_bytes(mixed, 512) == two.shape[0] * ops.record_bytes(4, 512)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bucket", [8, 64, 512])
def test_mixed_bytes_match_reference_records(stochastic, bucket):
    for seed, chunks in [(0, 1), (1, 3), (2, 4)]:
        segments, bits, numel = _mixed_case(seed, bucket=bucket, max_len=3 * bucket)
        table = ops.bucket_table(segments, bucket, pad_to_multiple=chunks, bits=bits)
        x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
        payload = Q.quantize(x, None, table, -1, 0, bucket, stochastic, 77, 0, 0)
        assert payload.dim() == 1 and payload.numel() == ops.mixed_payload_bytes(table, bucket)
        assert np.array_equal(payload.numpy(), mixed_reference(x, table, bucket, stochastic, 77))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_round_trip_and_error_feedback(dtype):
    bucket = 64
    segments, bits, numel = _mixed_case(5, n_segments=7, bucket=bucket)
    table = ops.bucket_table(segments, bucket, pad_to_multiple=2, bits=bits)
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    residual = torch.randn(numel, generator=torch.Generator().manual_seed(4)) * 0.01
    before = residual.clone()
    payload = Q.quantize(x, residual, table, -1, 0, bucket, True, 5, 0, 0)
    out = torch.full((numel,), 123.0)
    Q.dequantize_into(payload, out, table, 0, bucket)
    compensated = x.float() + before
    covered = torch.zeros(numel, dtype=torch.bool)
    for (o, n), b in zip(segments, bits):
        covered[o:o + n] = True
        seg = compensated[o:o + n].double()
        unit = bucket_units(seg, b, bucket)
        err = (out[o:o + n].double() - seg).abs()
        assert torch.all(err <= unit * (1 + 1e-5) + 1e-6), (o, n, b)
    # Error feedback is exact on covered elements; the others are untouched.
    assert torch.equal(residual[covered], (compensated - out)[covered])
    assert torch.equal(residual[~covered], before[~covered])
    assert torch.all(out[~covered] == 123.0)
    # Decoding into the input's dtype rounds once more, like the uniform path.
    out_typed = torch.zeros(numel, dtype=dtype)
    Q.dequantize_into(payload, out_typed, table, 0, bucket)
    assert torch.equal(out_typed[covered], out[covered].to(dtype))


def test_mixed_dequantize_sum_and_chunk_requantize():
    bucket, world = 64, 3
    segments, bits, numel = _mixed_case(9, n_segments=9, bucket=bucket)
    table = ops.bucket_table(segments, bucket, pad_to_multiple=world, bits=bits)
    per = table.shape[0] // world
    chunk_bytes = ops.mixed_payload_bytes(table, bucket) // world
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(s)) for s in range(world)]
    payloads = [Q.quantize(x, None, table, -1, 0, bucket, True, s, 0, 0) for s, x in enumerate(xs)]
    decoded = []
    for p in payloads:
        d = torch.zeros(numel)
        Q.dequantize_into(p, d, table, 0, bucket)
        decoded.append(d)
    init = torch.randn(numel).to(torch.bfloat16)
    rows = table.tolist()
    for c in range(world):
        stacked = torch.stack([p[c * chunk_bytes:(c + 1) * chunk_bytes] for p in payloads])
        reduced = Q.dequantize_sum(stacked, init, table, c * per, 0, bucket)
        assert reduced.shape == (per * bucket,)
        for j in range(per):
            offset, length = rows[c * per + j][:2]
            expected = init[offset:offset + length].float().clone()
            for d in decoded:
                expected += d[offset:offset + length]
            assert torch.equal(reduced[j * bucket:j * bucket + length], expected)
        # Re-quantizing the reduced chunk: each bucket with its row's bits, over the row's length.
        requant = Q.quantize(reduced, None, table, per, 0, bucket, True, 3, 0, 0, table, c * per)
        assert requant.numel() == chunk_bytes
        chunk_rows = [(j * bucket, rows[c * per + j][1], rows[c * per + j][2], 0) for j in range(per)]
        expected_bytes = mixed_reference(reduced, torch.tensor(chunk_rows), bucket, True, 3)
        assert np.array_equal(requant.numpy(), expected_bytes)
    # Without init, zero records are skipped, and the sum of a single source decodes it.
    single = Q.dequantize_sum(payloads[0].view(1, -1), None, table, 0, 0, bucket)
    for j, (offset, length, _, _) in enumerate(rows):
        assert torch.equal(single[j * bucket:j * bucket + length], decoded[0][offset:offset + length])


def test_mixed_empty_and_tiny_tables():
    empty = ops.bucket_table([], 8, pad_to_multiple=4, bits=[])
    assert empty.shape == (0, 4)
    x = torch.randn(10)
    payload = Q.quantize(x, None, empty, -1, 0, 8, True, 0, 0, 0)
    assert payload.shape == (0,)
    Q.dequantize_into(payload, x, empty, 0, 8)
    tiny = ops.bucket_table([(3, 1), (5, 0), (6, 4)], 8, pad_to_multiple=2, bits=[1, 8, 3])
    _check_table_structure(tiny, 8, 2)
    for dtype in DTYPES:
        y = x.to(dtype)
        p = Q.quantize(y, None, tiny, -1, 0, 8, False, 0, 0, 0)
        out = torch.zeros(10, dtype=dtype)
        Q.dequantize_into(p, out, tiny, 0, 8)
        assert out[3] == y[3]  # one element: min, unit 0
        assert torch.all(out[:3] == 0) and out[4] == 0 and torch.all(out[10:] == 0)
        assert torch.allclose(out[6:10].float(), y[6:10].float(), atol=float((y[6:10].float().max()
                                                                              - y[6:10].float().min()) / 7))
    # The skip range writes zero records of each row's own size.
    table = ops.bucket_table([(0, 64)], 8, bits=[5])
    p = Q.quantize(torch.randn(64) + 3, None, table, -1, 0, 8, True, 0, 2, 5)
    rec = 8 + 5
    assert p[2 * rec:5 * rec].eq(0).all() and p[:2 * rec].ne(0).any() and p[5 * rec:].ne(0).any()


def test_mixed_nonfinite_bucket_decodes_as_nan():
    table = ops.bucket_table([(0, 100), (100, 100)], 64, bits=[2, 7])
    x = torch.randn(200)
    x[150] = float("nan")
    residual = torch.full((200,), 0.5)
    out = torch.zeros(200)
    Q.dequantize_into(Q.quantize(x, residual, table, -1, 0, 64, True, 0, 0, 0), out, table, 0, 64)
    nan_rows = [r for r in table.tolist() if r[0] <= 150 < r[0] + r[1]]
    o, n = nan_rows[0][:2]
    assert torch.isnan(out[o:o + n]).all() and torch.isfinite(out[:o]).all() and torch.isfinite(out[o + n:]).all()
    assert torch.all(residual[o:o + n] == 0.5)


def test_mixed_bad_tables_are_rejected():
    bucket = 64
    table = ops.bucket_table([(0, 100), (100, 300)], bucket, pad_to_multiple=2, bits=[3, 6])
    x = torch.randn(400)
    payload = Q.quantize(x, None, table, -1, 0, bucket, False, 0, 0, 0)

    def bad(column, row, value):
        t = table.clone()
        t[row, column] = value
        return t

    with pytest.raises(RuntimeError, match="bits must be in"):
        Q.quantize(x, None, bad(2, 1, 0), -1, 0, bucket, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="bits must be in"):
        Q.dequantize_into(payload, torch.empty(400), bad(2, 0, 9), 0, bucket)
    with pytest.raises(RuntimeError, match="byte_offset"):
        Q.quantize(x, None, bad(3, 2, int(table[2, 3]) + 1), -1, 0, bucket, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="byte_offset"):
        Q.dequantize_into(payload, torch.empty(400), bad(3, 0, 8), 0, bucket)
    with pytest.raises(RuntimeError, match="length"):
        Q.quantize(x, None, bad(1, 0, bucket + 1), -1, 0, bucket, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="offset"):
        Q.quantize(x, None, bad(0, 0, -5), -1, 0, bucket, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="pass bits=0"):
        Q.quantize(x, None, table, -1, 4, bucket, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="pass bits=0"):
        Q.dequantize_sum(payload.view(1, -1), None, table, 0, 3, bucket)
    # Payload lengths (what arrives from other ranks) must match the table.
    with pytest.raises(RuntimeError, match="bytes but bucket_table"):
        Q.dequantize_into(payload[:-1].contiguous(), torch.empty(400), table, 0, bucket)
    with pytest.raises(RuntimeError, match="flat records"):
        Q.dequantize_into(payload.view(1, -1), torch.empty(400), table, 0, bucket)
    with pytest.raises(RuntimeError, match="not a whole number"):
        Q.dequantize_sum(payload[:-3].contiguous().view(1, -1), None, table, 0, 0, bucket)
    with pytest.raises(RuntimeError, match="not a whole number"):
        Q.dequantize_sum(payload.view(1, -1), None, table, 1, 0, bucket)
    with pytest.raises(RuntimeError, match="outside bucket_table"):
        Q.dequantize_sum(payload.view(1, -1), None, table, table.shape[0] + 1, 0, bucket)
    with pytest.raises(RuntimeError, match="outside bucket_table"):
        Q.quantize(torch.randn(2 * bucket), None, table, 2, 0, bucket, False, 0, 0, 0, table, table.shape[0] - 1)
    with pytest.raises(RuntimeError, match="host_table must be"):
        Q.quantize(x, None, table, -1, 0, bucket, False, 0, 0, 0, table[:-1].contiguous())
    with pytest.raises(RuntimeError, match="host_table is only used"):
        Q.quantize(x, None, table[:, :2].contiguous(), -1, 4, bucket, False, 0, 0, 0, table)
    with pytest.raises(RuntimeError, match="chunk_row_begin is only used"):
        Q.quantize(x, None, None, -1, 4, bucket, False, 0, 0, 0, None, 0)
    with pytest.raises(RuntimeError, match=r"\[num_buckets, 2\]"):
        Q.quantize(x, None, torch.zeros(2, 3, dtype=torch.long), -1, 4, bucket, False, 0, 0, 0)
    with pytest.raises(ValueError, match="one entry per segment"):
        ops.bucket_table([(0, 10)], 8, bits=[1, 2])
    with pytest.raises(ValueError, match=r"bits must be integers in \[1, 8\]"):
        ops.bucket_table([(0, 10)], 8, bits=[9])



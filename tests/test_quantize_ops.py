"""Quantization ops on CPU: exact bytes against a reference, error bounds, bias, fused variants, errors."""

import math

import numpy as np
import pytest
import torch

import pycomm
from pycomm import ops
from quant_reference import quantize_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 513, 4099, (1 << 18) + 5]
OUTPUT_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def bucket_units(x64: torch.Tensor, bits: int, bucket_size: int) -> torch.Tensor:
    """Per-element unit (max - min) / (2^bits - 1) of the element's bucket, in float64."""
    n = x64.numel()
    nb = -(-n // bucket_size)
    pad = torch.full((nb * bucket_size,), float("nan"), dtype=torch.float64)
    pad[:n] = x64
    pad = pad.view(nb, bucket_size)
    rng = (torch.nan_to_num(pad, nan=-math.inf).amax(1) - torch.nan_to_num(pad, nan=math.inf).amin(1))
    return (rng / (2**bits - 1)).repeat_interleave(bucket_size)[:n]


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


def test_opcheck():
    x = torch.randn(1000)
    residual = torch.zeros(1000)
    torch.library.opcheck(torch.ops.pycomm.quantize.default, (x, residual, None, -1, 4, 512, False, 0, 0, 0))
    payload = torch.ops.pycomm.quantize(x, None, None, -1, 4, 512, False, 0, 0, 0)
    torch.library.opcheck(torch.ops.pycomm.dequantize_into.default, (payload, torch.empty(1000), None, 4, 512))
    torch.library.opcheck(torch.ops.pycomm.dequantize_sum.default,
                          (torch.stack([payload, payload]), x, None, 0, 4, 512))


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

"""Kernel benchmarks: quantize with error feedback and dequantize_sum on a 25 MB float32 bucket.

Each group holds pycomm's kernel, ``x.clone()`` (memory-traffic baseline) and the
pure-torch way (per-bucket min/max and rounding in torch ops, as PyTorch's
quantization hooks do), measured in the same run. ``make bench`` prints the ratios.
"""

import pytest
import torch

import pycomm

NUMEL = 25 * 1024 * 1024 // 4  # 25 MB of float32
BUCKET = 512
WORLD = 4



def torch_quantize_ef(x, residual, bits, bucket):
    """Error-feedback quantization in plain torch ops (one byte per level, no bit packing)."""
    v = (x + residual).view(-1, bucket)
    mn = v.amin(1, keepdim=True)
    unit = (v.amax(1, keepdim=True) - mn) / (2**bits - 1)
    inv = torch.where(unit > 0, 1 / unit, torch.zeros_like(unit))
    levels = ((v - mn) * inv + 0.5).floor_().clamp_(0, 2**bits - 1).to(torch.uint8)
    residual.copy_((v - (mn + levels * unit)).view(-1))
    return levels, mn, unit


def torch_dequantize_sum(parts):
    out = torch.zeros(parts[0][0].numel(), device=parts[0][0].device)
    for levels, mn, unit in parts:
        out += (mn + levels * unit).view(-1)
    return out



@pytest.fixture(scope="module")
def bucket(device):
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)).to(device)



@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_ef_pycomm(benchmark, run, device, bucket, bits):
    benchmark.group = f"quantize_ef-{device}-{bits}bit"
    residual = torch.zeros_like(bucket)
    run(benchmark, lambda: pycomm.ops.quantize_with_error_feedback(
        bucket, residual, bits=bits, bucket_size=BUCKET, stochastic=False))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_ef_stochastic_pycomm(benchmark, run, device, bucket, bits):
    benchmark.group = f"quantize_ef-{device}-{bits}bit"
    residual = torch.zeros_like(bucket)
    run(benchmark, lambda: pycomm.ops.quantize_with_error_feedback(
        bucket, residual, bits=bits, bucket_size=BUCKET, stochastic=True, seed=1))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_ef_torch(benchmark, run, device, bucket, bits):
    benchmark.group = f"quantize_ef-{device}-{bits}bit"
    residual = torch.zeros_like(bucket)
    run(benchmark, lambda: torch_quantize_ef(bucket, residual, bits, BUCKET))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_ef_clone(benchmark, run, device, bucket, bits):
    benchmark.group = f"quantize_ef-{device}-{bits}bit"
    run(benchmark, lambda: bucket.clone())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_sum_pycomm(benchmark, run, device, bucket, bits):
    benchmark.group = f"dequantize_sum-{device}-{bits}bit"
    payloads = torch.stack([pycomm.ops.quantize(bucket, bits=bits, seed=s).payload for s in range(WORLD)])
    run(benchmark, lambda: torch.ops.pycomm.dequantize_sum(payloads, None, None, 0, bits, BUCKET))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_sum_torch(benchmark, run, device, bucket, bits):
    benchmark.group = f"dequantize_sum-{device}-{bits}bit"
    parts = [torch_quantize_ef(bucket, torch.zeros_like(bucket), bits, BUCKET) for _ in range(WORLD)]
    run(benchmark, lambda: torch_dequantize_sum(parts))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_sum_clone(benchmark, run, device, bucket, bits):
    benchmark.group = f"dequantize_sum-{device}-{bits}bit"
    run(benchmark, lambda: bucket.clone())


# ---- mixed bit widths in one bucket (per-layer bits, L-GreCo) vs one width ----
# The same 16 layers of the 25 MB bucket, quantized with error feedback through a
# bucket table: one width for all (2-column table) vs widths cycling 2, 3, 4, 8
# (4-column mixed table); same run, same baseline (clone).

LAYERS = 16
MIXED_BITS = [2, 3, 4, 8] * (LAYERS // 4)


def _layer_segments():
    size = NUMEL // LAYERS
    return [(i * size, size) for i in range(LAYERS)]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_table_uniform(benchmark, run, device, bucket, bits):
    benchmark.group = f"quantize_mixed-{device}"
    table = pycomm.ops.bucket_table(_layer_segments(), BUCKET, device=device)
    residual = torch.zeros_like(bucket)
    run(benchmark, lambda: torch.ops.pycomm.quantize(bucket, residual, table, -1, bits, BUCKET, False, 0, 0, 0))


def test_quantize_table_mixed(benchmark, run, device, bucket):
    benchmark.group = f"quantize_mixed-{device}"
    host = pycomm.ops.bucket_table(_layer_segments(), BUCKET, bits=MIXED_BITS)
    table = host.to(device)
    residual = torch.zeros_like(bucket)
    run(benchmark, lambda: torch.ops.pycomm.quantize(bucket, residual, table, -1, 0, BUCKET, False, 0, 0, 0, host))


def test_quantize_table_clone(benchmark, run, device, bucket):
    benchmark.group = f"quantize_mixed-{device}"
    run(benchmark, lambda: bucket.clone())

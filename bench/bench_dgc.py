"""DGC benchmarks on a 25 MB float32 bucket at density 0.001.

Each group holds pycomm's full compress step (momentum correction + top-k
selection + momentum factor masking), ``torch.topk(v.abs(), k)`` alone, and
``x.clone()``, measured in the same run. ``make bench`` prints the ratios.
"""

import math

import pytest
import torch

import pycomm

NUMEL = 25 * 1024 * 1024 // 4
DENSITY = 0.001




@pytest.fixture(scope="module")
def grad(device):
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)).to(device)



@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_dgc_compress_pycomm(benchmark, run, device, grad, mode):
    benchmark.group = f"dgc_compress-{device}"
    dgc = pycomm.compressors.DGC(density=DENSITY, momentum=0.9, exact=mode == "exact")
    run(benchmark, lambda: dgc.compress(grad))


def test_dgc_compress_torch(benchmark, run, device, grad):
    benchmark.group = f"dgc_compress-{device}"
    k = math.ceil(NUMEL * DENSITY)
    v = grad.clone()
    run(benchmark, lambda: torch.topk(v.abs(), k))


def test_dgc_compress_clone(benchmark, run, device, grad):
    benchmark.group = f"dgc_compress-{device}"
    run(benchmark, lambda: grad.clone())

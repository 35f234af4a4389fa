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
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def grad(device):
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)).to(device)


def _run(benchmark, device, fn):
    def call():
        fn()
        _sync(device)
    benchmark.pedantic(call, rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_dgc_compress_pycomm(benchmark, device, grad, mode):
    benchmark.group = f"dgc_compress-{device}"
    dgc = pycomm.compressors.DGC(density=DENSITY, momentum=0.9, exact=mode == "exact")
    _run(benchmark, device, lambda: dgc.compress(grad))


def test_dgc_compress_torch(benchmark, device, grad):
    benchmark.group = f"dgc_compress-{device}"
    k = math.ceil(NUMEL * DENSITY)
    v = grad.clone()
    _run(benchmark, device, lambda: torch.topk(v.abs(), k))


def test_dgc_compress_clone(benchmark, device, grad):
    benchmark.group = f"dgc_compress-{device}"
    _run(benchmark, device, lambda: grad.clone())

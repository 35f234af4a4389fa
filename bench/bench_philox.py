"""Philox perturbation benchmarks on 25 MB of float32 parameters (four tensors).

Group ``philox_axpy-<device>``: pycomm's ``philox_axpy_`` (``t += eps * z`` with z
regenerated from a seed, Gaussian and Rademacher), the MeZO way (a seeded
``torch.randn`` per parameter, then ``add_``), and ``x.clone()`` of the same tensors,
measured in the same run. Group ``philox_dot-<device>``: ``philox_dot`` against
``torch.randn`` + ``torch.dot`` per parameter. ``make bench`` prints the ratios
(bench/ratios.py keys on the ``_pycomm`` / ``_torch`` / ``_clone`` suffixes).
"""

import pytest
import torch

import pycomm

SIZES = [4_194_304, 1_572_864, 782_336, 4_096]  # 6,553,600 float32 = 25 MB
EPS = 1e-3




@pytest.fixture(scope="module")
def tensors(device):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g).to(device) for n in SIZES]



@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_philox_axpy_pycomm(benchmark, run, device, tensors, distribution):
    benchmark.group = f"philox_axpy-{device}"
    run(benchmark, lambda: pycomm.ops.philox_axpy_(tensors, 1234, EPS, distribution))


def test_philox_axpy_torch(benchmark, run, device, tensors):
    benchmark.group = f"philox_axpy-{device}"

    def mezo():
        gen = torch.Generator(device=device).manual_seed(1234)
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=gen, device=device), alpha=EPS)

    run(benchmark, mezo)


def test_philox_axpy_clone(benchmark, run, device, tensors):
    benchmark.group = f"philox_axpy-{device}"
    run(benchmark, lambda: [t.clone() for t in tensors])


def test_philox_dot_pycomm(benchmark, run, device, tensors):
    benchmark.group = f"philox_dot-{device}"
    run(benchmark, lambda: torch.ops.pycomm.philox_dot(tensors, 1234, 0, 0))


def test_philox_dot_torch(benchmark, run, device, tensors):
    benchmark.group = f"philox_dot-{device}"

    def randn_dot():
        gen = torch.Generator(device=device).manual_seed(1234)
        return sum(torch.dot(t, torch.randn(t.shape, generator=gen, device=device)) for t in tensors)

    run(benchmark, randn_dot)


def test_philox_dot_clone(benchmark, run, device, tensors):
    benchmark.group = f"philox_dot-{device}"
    run(benchmark, lambda: [t.clone() for t in tensors])

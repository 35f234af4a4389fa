"""CUDA Philox ops against the CPU ops: identical variates, axpy / perturbed-copy results
and dot products, bit for bit.

The CPU kernels (csrc/cpu/philox_cpu.cpp, checked against a numpy reference in
test_philox_ops.py) are the reference. The cases cross the CUDA kernels' internal
boundaries: tensor lists longer than one launch batch (48 tensors), dtype changes
inside a list, dot chunks (4096 indices) spanning tensors and batches, offsets that
are not multiples of 4, large offsets, and sizes beyond one launch wave. Runs only
on a machine with a GPU and a CUDA build of pycomm.
"""

import pytest
import torch

import pycomm
from pycomm import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
SEEDS = [0, 7, -3, 2**63 + 5]


def assert_identical(cpu: torch.Tensor, gpu: torch.Tensor, what: str = "") -> None:
    gpu = gpu.cpu()
    assert cpu.dtype == gpu.dtype and cpu.shape == gpu.shape, what
    iv = INT_VIEW[cpu.dtype]
    bc, bg = cpu.contiguous().view(iv), gpu.contiguous().view(iv)
    if not torch.equal(bc, bg):
        bad = (bc != bg).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} elements differ, first at {i}: {cpu[i].item()!r} vs "
                             f"{gpu[i].item()!r}")


def params(sizes, seed=0, dtypes=(torch.float32,)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtypes[i % len(dtypes)]) for i, s in enumerate(sizes)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 1, 4093, 2**33 + 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_variates_identical(seed, offset, dtype):
    for n in (1, 5, 1000, 3_000_001):
        for make in (ops.philox_normal, ops.philox_rademacher):
            cpu = make(n, seed, offset, dtype=dtype)
            gpu = make(n, seed, offset, dtype=dtype, device="cuda")
            assert_identical(cpu, gpu, f"{make.__name__} n={n}")


LISTS = {
    "one": [1_000_003],
    "mixed_sizes": [1, 2, 3, 4093, 0, 7, 128, 200_000, 5, 4096, 11],
    "many_tiny": [3] * 150 + [1] * 60 + [4097] * 3,         # several launch batches inside dot chunks
    "large": [4_194_304, 1_572_864, 786_432],
}


@pytest.mark.parametrize("layout", sorted(LISTS))
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,),
                                    (torch.float32, torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_axpy_and_copy_identical(layout, dtypes, distribution):
    xs = params(LISTS[layout], seed=1, dtypes=dtypes)
    for offset in (0, 4090):
        cpu = [x.clone() for x in xs]
        gpu = [x.cuda() for x in xs]
        ops.philox_axpy_(cpu, 17, -3e-3, distribution, offset)
        ops.philox_axpy_(gpu, 17, -3e-3, distribution, offset)
        for i, (c, g) in enumerate(zip(cpu, gpu)):
            assert_identical(c, g, f"axpy tensor {i}")
        copies = ops.philox_perturbed_copy([x.cuda() for x in xs], 17, -3e-3, distribution, offset)
        for i, (c, g) in enumerate(zip(cpu, copies)):
            assert_identical(c, g, f"perturbed_copy tensor {i}")


@pytest.mark.parametrize("layout", sorted(LISTS))
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float32, torch.float16)])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_dot_identical(layout, dtypes, distribution):
    xs = params(LISTS[layout], seed=2, dtypes=dtypes)
    for seed in SEEDS:
        for offset in (0, 3, 4095, 2**33 + 6):
            cpu = ops.philox_dot(xs, seed, distribution, offset)
            gpu = ops.philox_dot([x.cuda() for x in xs], seed, distribution, offset)
            assert cpu == gpu, (seed, offset, cpu, gpu)


def test_dot_split_invariant_on_cuda():
    xs = [x.cuda() for x in params(LISTS["many_tiny"], seed=3)]
    flat = torch.cat(xs)
    assert ops.philox_dot(xs, 5, offset=4000) == ops.philox_dot(flat, 5, offset=4000)
    out = torch.ops.pycomm.philox_dot(xs, 5, 0, 4000)
    assert out.device.type == "cuda" and out.dtype == torch.float64 and out.dim() == 0


def test_nan_positions_agree():
    x = torch.randn(10_000)
    x[::7] = float("nan")
    cpu, gpu = x.clone(), x.cuda()
    ops.philox_axpy_(cpu, 1, 0.5)
    ops.philox_axpy_(gpu, 1, 0.5)
    assert torch.equal(torch.isnan(cpu), torch.isnan(gpu.cpu()))
    ok = ~torch.isnan(cpu)
    assert torch.equal(cpu[ok], gpu.cpu()[ok])


def test_runs_on_a_side_stream():
    x = torch.randn(100_000)
    ref = x.clone()
    ops.philox_axpy_(ref, 9, 1.0)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = x.cuda()
        ops.philox_axpy_(g, 9, 1.0)
    s.synchronize()
    assert_identical(ref, g)

"""CUDA Philox ops against the CPU ops: identical variates, axpy / perturbed-copy results
and dot products (one or K directions per launch), bit for bit, and the projection hook
without a host sync.

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

from cuda_support import INT_VIEW, REQUIRES_CUDA

pytestmark = REQUIRES_CUDA

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


# ---- K directions in one launch ------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LISTS))
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float32, torch.float16)])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_multi_direction_ops_identical(layout, dtypes, distribution):
    xs = params(LISTS[layout], seed=4, dtypes=dtypes)
    seeds = [SEEDS[k % len(SEEDS)] + k for k in range(37)]  # two launch groups (32 + 5)
    alphas = torch.linspace(-2e-3, 2e-3, len(seeds), dtype=torch.float64)
    alphas[5] = 0.0  # skipped
    for offset in (0, 4090):
        cpu = [x.clone() for x in xs]
        ops.philox_axpy_multi_(cpu, seeds, alphas, distribution, offset)
        for where in ("cuda", "cpu"):  # alphas read by the kernel, or on the host
            gpu = [x.cuda() for x in xs]
            ops.philox_axpy_multi_(gpu, seeds, alphas.to(where), distribution, offset)
            for i, (c, g) in enumerate(zip(cpu, gpu)):
                assert_identical(c, g, f"axpy_multi tensor {i}, alphas on {where}")
        d_cpu = ops.philox_dot_multi(xs, seeds, distribution, offset)
        d_gpu = ops.philox_dot_multi([x.cuda() for x in xs], seeds, distribution, offset)
        assert d_gpu.device.type == "cuda" and d_gpu.dtype == torch.float64
        assert torch.equal(d_cpu, d_gpu.cpu())


def test_multi_direction_ops_do_not_sync():
    xs = [x.cuda() for x in params(LISTS["mixed_sizes"], seed=5)]
    seeds = list(range(40))
    ops.philox_dot_multi(xs, seeds)  # warm-up: allocator, module loading
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d = ops.philox_dot_multi(xs, seeds)
        ops.philox_axpy_multi_(xs, seeds, -d / 1e3)
        ops.philox_axpy_(xs, 1, d[0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(d).all()


class _Bucket:
    """What projection_hook reads of a DDP GradBucket."""

    def __init__(self, buffer: torch.Tensor, parameters: list, index: int = 0, last: bool = True) -> None:
        self._buffer, self._parameters, self._index, self._last = buffer, parameters, index, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list:
        return list(self._parameters)

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_projection_hook_no_host_sync_and_same_bits_as_cpu(tmp_path):
    import torch.distributed as dist
    from pycomm.hooks.spsa_projection import ProjectionState, projection_hook

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        gloo = dist.new_group(backend="gloo")
        grads = [torch.randn(300_001, generator=torch.Generator().manual_seed(s)) for s in range(4)]

        def model_params(device):  # two parameters; the bucket holds them in reverse model order
            return {"a": torch.zeros(100_000, device=device, requires_grad=True),
                    "b": torch.zeros(200_001, device=device, requires_grad=True)}

        gpu_params, cpu_params = model_params("cuda"), model_params("cpu")
        gpu_state = ProjectionState(num_directions=40, seed=3, error_feedback=True).bind(gpu_params)
        cpu_state = ProjectionState(process_group=gloo, num_directions=40, seed=3, error_feedback=True).bind(cpu_params)
        gpu_bucket = [gpu_params["b"], gpu_params["a"]]
        cpu_bucket = [cpu_params["b"], cpu_params["a"]]
        projection_hook(gpu_state, _Bucket(grads[0].cuda(), gpu_bucket))  # first call: plan, codec tables to the GPU
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu_out = [projection_hook(gpu_state, _Bucket(g.cuda(), gpu_bucket)).value() for g in grads[1:]]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        projection_hook(cpu_state, _Bucket(grads[0].clone(), cpu_bucket))
        cpu_out = [projection_hook(cpu_state, _Bucket(g.clone(), cpu_bucket)).value() for g in grads[1:]]
        for c, g in zip(cpu_out, gpu_out):
            assert_identical(c, g, "hook output")
            assert c.abs().sum() > 0
        cpu_saved, gpu_saved = cpu_state.state_dict()["params"], gpu_state.state_dict()["params"]
        for name in ("a", "b"):
            assert cpu_saved[name]["residual"].abs().sum() > 0
            assert_identical(cpu_saved[name]["residual"], gpu_saved[name]["residual"].cpu(), f"residual of {name}")
    finally:
        dist.destroy_process_group()

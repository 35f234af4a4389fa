"""Philox perturbation benchmarks on 25 MB of float32 parameters (four tensors).

Group ``philox_axpy-<device>``: pycomm's ``philox_axpy_`` (``t += eps * z`` with z
regenerated from a seed, Gaussian and Rademacher), the MeZO way (a seeded
``torch.randn`` per parameter, then ``add_``), and ``x.clone()`` of the same tensors,
measured in the same run. Group ``philox_dot-<device>``: ``philox_dot`` against
``torch.randn`` + ``torch.dot`` per parameter. ``make bench`` prints the ratios
(bench/ratios.py keys on the ``_pycomm`` / ``_torch`` / ``_clone`` suffixes).

K = 8 directions at once (the projection hook's ops), on the same tensors: group
``philox_multi_axpy-<device>``: ``philox_axpy_multi_`` (one pass, alphas a device
tensor) against K successive ``philox_axpy_`` calls (``_single``) and K seeded
``torch.randn`` + ``add_`` (``_torch``); group ``philox_multi_dot-<device>``:
``philox_dot_multi`` against K ``philox_dot`` launches and K ``torch.randn`` +
``torch.dot``.

Group ``projection_hook-cuda`` (only with a GPU): one step of the projection hook on a
25 MB bucket (K = 8, error feedback, one-rank NCCL group) against the same step in
pure torch with the K directions materialized (``torch.randn(K, n)``, two mat-vec
products, the same codec and all-gather).
"""

import pytest
import torch

import pycomm

SIZES = [4_194_304, 1_572_864, 782_336, 4_096]  # 6,553,600 float32 = 25 MB
EPS = 1e-3
K = 8
MULTI_SEEDS = [1234 + k for k in range(K)]




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


# ---- K directions per call ----------------------------------------------------------------

@pytest.fixture(scope="module")
def alphas(device):
    return torch.linspace(-EPS, EPS, K, dtype=torch.float64, device=device)


def test_philox_multi_axpy_pycomm(benchmark, run, device, tensors, alphas):
    benchmark.group = f"philox_multi_axpy-{device}"
    run(benchmark, lambda: pycomm.ops.philox_axpy_multi_(tensors, MULTI_SEEDS, alphas))


def test_philox_multi_axpy_single(benchmark, run, device, tensors, alphas):
    benchmark.group = f"philox_multi_axpy-{device}"
    values = alphas.tolist()  # host floats, as the per-direction op takes them

    def successive():
        for seed, alpha in zip(MULTI_SEEDS, values):
            pycomm.ops.philox_axpy_(tensors, seed, alpha)

    run(benchmark, successive)


def test_philox_multi_axpy_torch(benchmark, run, device, tensors, alphas):
    benchmark.group = f"philox_multi_axpy-{device}"
    values = alphas.tolist()

    def mezo():
        gen = torch.Generator(device=device).manual_seed(1234)
        for alpha in values:
            for t in tensors:
                t.add_(torch.randn(t.shape, generator=gen, device=device), alpha=alpha)

    run(benchmark, mezo)


def test_philox_multi_axpy_clone(benchmark, run, device, tensors):
    benchmark.group = f"philox_multi_axpy-{device}"
    run(benchmark, lambda: [t.clone() for t in tensors])


def test_philox_multi_dot_pycomm(benchmark, run, device, tensors):
    benchmark.group = f"philox_multi_dot-{device}"
    run(benchmark, lambda: torch.ops.pycomm.philox_dot_multi(tensors, MULTI_SEEDS, 0, 0))


def test_philox_multi_dot_single(benchmark, run, device, tensors):
    benchmark.group = f"philox_multi_dot-{device}"
    run(benchmark, lambda: torch.stack([torch.ops.pycomm.philox_dot(tensors, s, 0, 0) for s in MULTI_SEEDS]))


def test_philox_multi_dot_torch(benchmark, run, device, tensors):
    benchmark.group = f"philox_multi_dot-{device}"

    def randn_dots():
        gen = torch.Generator(device=device).manual_seed(1234)
        return torch.stack([sum(torch.dot(t, torch.randn(t.shape, generator=gen, device=device)) for t in tensors)
                            for _ in range(K)])

    run(benchmark, randn_dots)


def test_philox_multi_dot_clone(benchmark, run, device, tensors):
    benchmark.group = f"philox_multi_dot-{device}"
    run(benchmark, lambda: [t.clone() for t in tensors])


# ---- the projection hook on a GPU --------------------------------------------------------------

BUCKET = sum(SIZES)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                                reason="the projection hook benchmark needs a CUDA device and NCCL")


class _Bucket:
    def __init__(self, buffer):
        self._buffer = buffer

    def buffer(self):
        return self._buffer

    def index(self):
        return 0

    def is_last(self):
        return True


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    yield None
    if created:
        dist.destroy_process_group()


def _cuda_run(benchmark, fn, rounds=15):
    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=2)


@pytest.fixture(scope="module")
def gradient():
    return torch.randn(BUCKET, generator=torch.Generator().manual_seed(1)).cuda()


@needs_cuda
def test_projection_hook_pycomm(benchmark, nccl_group, gradient):
    from pycomm.hooks.spsa_projection import ProjectionState, projection_hook

    benchmark.group = "projection_hook-cuda"
    state = ProjectionState(num_directions=K, error_feedback=True)
    buffer = gradient.clone()
    _cuda_run(benchmark, lambda: projection_hook(state, _Bucket(buffer.copy_(gradient))))


@needs_cuda
def test_projection_hook_torch(benchmark, nccl_group, gradient):
    import torch.distributed as dist
    from pycomm.codec import LogByteCodec
    from pycomm.distributed import all_gather_into_tensor

    benchmark.group = "projection_hook-cuda"
    codec = LogByteCodec(1e-7, 10.0)
    residual = torch.zeros_like(gradient)
    buffer = gradient.clone()
    world, rank = dist.get_world_size(), dist.get_rank()

    def step():
        x = buffer.copy_(gradient) + residual
        gen = torch.Generator(device="cuda").manual_seed(1234)
        z = torch.randn(K, BUCKET, generator=gen, device="cuda")
        codes = codec.encode(z @ x / BUCKET)
        gathered = torch.empty(world * K, dtype=torch.uint8, device="cuda")
        all_gather_into_tensor(gathered, codes)
        decoded = codec.decode(gathered).view(world, K).float()
        torch.sub(x, decoded[rank] @ z, out=residual)
        buffer.copy_(decoded.sum(0) @ z / world)

    _cuda_run(benchmark, step)


@needs_cuda
def test_projection_hook_clone(benchmark, gradient):
    benchmark.group = "projection_hook-cuda"
    _cuda_run(benchmark, lambda: gradient.clone())

"""Skip rules shared by the CUDA tests.

Two different reasons to skip, and one reason to fail:
- no CUDA GPU on this machine: skipped, and the reason says whether the kernels are built;
- a GPU but pycomm built without (some) CUDA kernels: the test *fails*, since on a GPU machine
  that is a broken build (``PYCOMM_CUDA=1 pip install --no-build-isolation -e .`` fixes it),
  not a missing device.

Use ``pytestmark = REQUIRES_CUDA`` in a module, or ``@pytest.mark.parametrize``-style
``@requires_cuda`` on one test.
"""

import pytest
import torch

from pycomm import kernels


def cuda_skip_reason() -> str:
    """Why the CUDA tests cannot run here, or "" when a GPU is present."""
    if torch.cuda.is_available():
        return ""
    if kernels.missing_cuda_kernels():
        return "no CUDA GPU on this machine (and pycomm built without CUDA kernels)"
    return "no CUDA GPU on this machine (pycomm's CUDA kernels are built)"


def fail_if_kernels_missing() -> None:
    """On a GPU machine, fail (not skip) when pycomm lacks CUDA kernels."""
    missing = kernels.missing_cuda_kernels()
    if torch.cuda.is_available() and missing:
        pytest.fail(f"a CUDA GPU is present but pycomm has no CUDA kernel for {', '.join(missing)}; "
                    "rebuild with PYCOMM_CUDA=1 pip install --no-build-isolation -e .", pytrace=False)


REQUIRES_CUDA = [
    pytest.mark.skipif(bool(cuda_skip_reason()), reason=cuda_skip_reason() or "a GPU is present"),
    pytest.mark.usefixtures("cuda_kernels_present"),
]


# Float tensors are compared through an integer view of the same width, i.e. bit for bit.
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_identical(cpu: torch.Tensor, gpu: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bits; NaNs must be NaN in the same places (their bits may differ)."""
    gpu = gpu.cpu()
    assert cpu.dtype == gpu.dtype and cpu.shape == gpu.shape, (f"{what}: {cpu.dtype}{tuple(cpu.shape)} vs "
                                                               f"{gpu.dtype}{tuple(gpu.shape)}")
    if cpu.dtype not in INT_VIEW:
        if not torch.equal(cpu, gpu):
            bad = (cpu != gpu).nonzero()
            raise AssertionError(f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}")
        return
    nan_c, nan_g = torch.isnan(cpu), torch.isnan(gpu)
    assert torch.equal(nan_c, nan_g), f"{what}: NaN positions differ"
    iv = INT_VIEW[cpu.dtype]
    diff = (cpu.contiguous().view(iv) != gpu.contiguous().view(iv)) & ~nan_c
    if diff.any():
        i = diff.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(diff.sum())} elements differ, first at {i}: "
                             f"cpu {cpu[tuple(i)].item()!r} gpu {gpu[tuple(i)].item()!r}")


def requires_cuda(test):
    """Decorator form of :data:`REQUIRES_CUDA` for a single test."""
    for mark in REQUIRES_CUDA:
        test = mark(test)
    return test

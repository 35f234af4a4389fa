"""Kernel registration: every pycomm op has its kernels on every device it is built for.

In a CUDA build (``make cuda-build`` sets ``PYCOMM_EXPECT_CUDA_KERNELS=1``) every operator except the
documented CPU-only ones must have a CUDA kernel, which is checked without a GPU.
"""

import os

import pytest
import torch

import pycomm
from pycomm import kernels

EXPECT_CUDA = os.environ.get("PYCOMM_EXPECT_CUDA_KERNELS") == "1"

# The operators csrc/ops.cpp and the L-GreCo solver define; a new op must be added here on purpose.
EXPECTED_OPS = {
    "pycomm::quantize", "pycomm::dequantize_into", "pycomm::dequantize_sum",
    "pycomm::dgc_compensate", "pycomm::topk_magnitude", "pycomm::dgc_mask", "pycomm::densify",
    "pycomm::philox_variates", "pycomm::philox_axpy_", "pycomm::philox_perturbed_copy", "pycomm::philox_dot",
    "pycomm::philox_axpy_multi_", "pycomm::philox_dot_multi", "pycomm::lgreco_solve",
}


def test_every_expected_op_is_registered():
    assert EXPECTED_OPS <= set(kernels.pycomm_ops()), sorted(EXPECTED_OPS - set(kernels.pycomm_ops()))


def test_every_op_has_a_cpu_kernel():
    assert kernels.ops_without_kernel("CPU") == []


def test_cpu_only_ops_exist():
    assert kernels.CPU_ONLY_OPS <= set(kernels.pycomm_ops())


def test_missing_cuda_kernels_is_consistent_with_the_dispatcher():
    missing = set(kernels.missing_cuda_kernels())
    for name in kernels.pycomm_ops():
        has = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        assert (name in missing) == (not has and name not in kernels.CPU_ONLY_OPS), name
    assert kernels.has_cuda_kernels() == (not missing)


def test_cpu_build_reports_every_cuda_kernel_missing():
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA: the build may have CUDA kernels")
    assert set(kernels.missing_cuda_kernels()) == set(kernels.pycomm_ops()) - kernels.CPU_ONLY_OPS


@pytest.mark.skipif(not EXPECT_CUDA, reason="not a CUDA build (make cuda-build sets PYCOMM_EXPECT_CUDA_KERNELS=1)")
def test_cuda_build_registers_a_cuda_kernel_for_every_op():
    assert torch.version.cuda is not None, "a CUDA build needs a CUDA torch"
    assert kernels.missing_cuda_kernels() == []
    for name in kernels.CPU_ONLY_OPS:  # CPU-only by design, and still only on the CPU
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


@pytest.mark.skipif(not EXPECT_CUDA, reason="not a CUDA build (make cuda-build sets PYCOMM_EXPECT_CUDA_KERNELS=1)")
def test_cuda_build_imports_without_a_gpu_and_runs_cpu_ops():
    # The CUDA extension loads on a machine with no GPU, and its CPU kernels work.
    x = torch.randn(1000)
    q = pycomm.ops.quantize(x, bits=8, bucket_size=512, stochastic=False)
    assert (pycomm.ops.dequantize(q) - x).abs().max() < 0.05

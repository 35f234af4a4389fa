"""The Python argument checks (pycomm.ops.validation) and the C++ ones (csrc/quantize_checks.h) accept and
refuse the same values, and the Python constants of the byte format are those the kernels use."""

import pytest
import torch

from pycomm import ops
from pycomm.ops.validation import HEADER_BYTES, MAX_BUCKET_SIZE, check_bits_bucket, check_float_tensor

Q = torch.ops.pycomm


def _python_accepts(bits, bucket_size) -> bool:
    try:
        check_bits_bucket(bits, bucket_size)
        return True
    except ValueError:
        return False


def _kernel_accepts(bits, bucket_size) -> bool:
    try:
        Q.quantize(torch.zeros(8), None, None, -1, bits, bucket_size, False, 0, 0, 0)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("bits", [-1, 0, 1, 4, 8, 9, 2**31])
@pytest.mark.parametrize("bucket_size", [-8, 0, 4, 8, 12, 512, MAX_BUCKET_SIZE, MAX_BUCKET_SIZE + 8, 2**40])
def test_python_and_cpp_agree_on_bits_and_bucket_size(bits, bucket_size):
    assert _python_accepts(bits, bucket_size) == _kernel_accepts(bits, bucket_size)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("bucket_size", [8, 64, 512])
def test_record_bytes_is_what_the_kernel_writes(bits, bucket_size):
    payload = Q.quantize(torch.randn(3 * bucket_size), None, None, -1, bits, bucket_size, False, 0, 0, 0)
    assert payload.shape == (3, ops.record_bytes(bits, bucket_size))
    assert ops.record_bytes(bits, bucket_size) == HEADER_BYTES + bucket_size * bits // 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_python_and_cpp_agree_on_dtypes(dtype):
    x = torch.zeros(8, dtype=dtype)
    try:
        check_float_tensor(x, "x")
        python = True
    except ValueError:
        python = False
    try:
        Q.quantize(x, None, None, -1, 4, 8, False, 0, 0, 0)
        kernel = True
    except RuntimeError:
        kernel = False
    assert python == kernel == (dtype in ops.SUPPORTED_DTYPES)

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (dist_utils, quant_reference, cuda_support)

from cuda_support import fail_if_kernels_missing  # noqa: E402


@pytest.fixture
def cuda_kernels_present() -> None:
    """Used by cuda_support.REQUIRES_CUDA: a GPU machine without pycomm's CUDA kernels fails."""
    fail_if_kernels_missing()

import fuzz_profiles  # noqa: E402,F401  (hypothesis profiles: default "pycomm-ci", "--hypothesis-profile=long")

"""Which ``torch.ops.pycomm`` operators have a kernel on which device.

A GPU user checks an install in one line::

    python -c "import pycomm; print(pycomm.kernels.missing_cuda_kernels() or 'all CUDA kernels present')"

``CPU_ONLY_OPS`` names the operators that are CPU-only by design; every other
operator must have a CUDA kernel in a CUDA build.
"""

from __future__ import annotations

import torch

from pycomm import _C  # noqa: F401  (registers torch.ops.pycomm)

__all__ = ["CPU_ONLY_OPS", "pycomm_ops", "ops_without_kernel", "missing_cuda_kernels", "has_cuda_kernels"]

# The L-GreCo solver runs on host tables a few times per training run; a GPU would not help it.
CPU_ONLY_OPS = frozenset({"pycomm::lgreco_solve"})


def pycomm_ops() -> list[str]:
    """Every registered ``pycomm::`` operator, sorted (e.g. ``"pycomm::quantize"``)."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("pycomm::"))


def ops_without_kernel(dispatch_key: str) -> list[str]:
    """The ``pycomm::`` operators that have no kernel for ``dispatch_key`` (``"CPU"``, ``"CUDA"``)."""
    return [name for name in pycomm_ops()
            if not torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)]


def missing_cuda_kernels() -> list[str]:
    """Operators that should have a CUDA kernel and do not: all of them in a CPU-only build, none in
    a complete CUDA build."""
    return [name for name in ops_without_kernel("CUDA") if name not in CPU_ONLY_OPS]


def has_cuda_kernels() -> bool:
    """True when this build of pycomm registers a CUDA kernel for every operator that needs one."""
    return not missing_cuda_kernels()

"""Build pycomm._C: the CPU kernels always, the CUDA kernels when possible.

PYCOMM_CUDA=1 forces the CUDA build (and fails without nvcc or a CUDA torch),
PYCOMM_CUDA=0 disables it; by default CUDA is built when torch has CUDA and
nvcc is found.
"""

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("PYCOMM_CUDA")
    available = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if flag == "1":
        if not available:
            raise RuntimeError("PYCOMM_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    if flag == "0":
        return False
    return available


def extension():
    include = [os.path.join(ROOT, "csrc", "include")]
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -ffp-contract=off: the CPU must round exactly like the GPU (no FMA fusion).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
    if want_cuda():
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
        nvcc = ["-O3", "-std=c++17", "--fmad=false", "-DPYCOMM_WITH_CUDA"]
        return CUDAExtension(
            "pycomm._C", sources, include_dirs=include,
            extra_compile_args={"cxx": cxx + ["-DPYCOMM_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("pycomm._C", sources, include_dirs=include, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


setup(
    name="pycomm",
    version="0.1.0",
    description="Compressed gradient communication for PyTorch DDP: C++/CUDA kernels and comm hooks",
    packages=find_packages(include=["pycomm", "pycomm.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"plot": ["matplotlib"]},
    entry_points={"console_scripts": ["pycomm=pycomm.cli:main"]},
)

"""Build pycomm._C: the CPU kernels always, the CUDA kernels when possible.

PYCOMM_CUDA=1 forces the CUDA build (and fails loudly, saying what it looked for, without a CUDA
torch or a CUDA toolkit), PYCOMM_CUDA=0 disables it; by default CUDA is built when torch has CUDA
and a toolkit is found. PYCOMM_BUILD_BASE sets the build folder (default build/). PYCOMM_WERROR=1 treats warnings in pycomm's own sources as errors (torch's
and CUDA's headers are included as system headers, so their warnings do not count).

The CUDA toolkit is found the way a GPU user's machine has it (see find_cuda_toolkit): from
CUDA_HOME or CUDA_PATH, else from the toolkit that the `nvcc` on the PATH really runs (it may be a
wrapper script outside the toolkit), else from the usual install folders. The CUDA library headers
that torch's own headers include (cuBLAS, cuSPARSE, ...) come from the toolkit, or else from torch's
`nvidia/*` wheels.
"""

import glob
import os
import re
import shutil
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
# Headers that torch's CUDA headers (ATen/cuda/CUDAContext.h) include besides the CUDA runtime's.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def _is_toolkit(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime_api.h")) \
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))


def _toolkit_behind_nvcc(nvcc: str) -> Optional[str]:
    """The toolkit that `nvcc` really runs: its dry run prints the folder of the real binary
    (`_HERE_=<toolkit>/bin`), also when `nvcc` is a wrapper script that lives elsewhere."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for key in ("_HERE_", "TOP"):
        match = re.search(rf"^#\$ {key}=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if match:
            path = os.path.normpath(match.group(1).strip())
            root = os.path.dirname(path) if key == "_HERE_" else path
            if _is_toolkit(root):
                return root
    real = os.path.realpath(nvcc)  # a symlink into the toolkit
    root = os.path.dirname(os.path.dirname(real))
    return root if _is_toolkit(root) else None


def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path)))


def find_cuda_toolkit() -> tuple[Optional[str], list[str]]:
    """(toolkit root or None, what was looked at, for the error message)."""
    looked = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(value):
                return value, looked
            looked.append(f"{var}={value} (no bin/nvcc and include/cuda_runtime_api.h there)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_behind_nvcc(nvcc)
        if root:
            return root, looked
        looked.append(f"the toolkit behind {nvcc} (its --dryrun named none)")
    else:
        looked.append("nvcc on the PATH (none)")
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*") + glob.glob("/opt/cuda*"),
                                              key=_version_key, reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return path, looked
    looked.append("/usr/local/cuda, /usr/local/cuda-*, /opt/cuda*")
    return None, looked


def _nvidia_wheel_include_dirs() -> list[str]:
    """Include folders of the `nvidia` wheels that a CUDA build of torch depends on (cu12: one wheel
    per library, `nvidia/<lib>/include`; cu13: one `nvidia/cu13/include`)."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(os.path.realpath(d) for d in dirs))


def find_library_headers(toolkit: str) -> tuple[Optional[list[str]], list[str]]:
    """Extra include folders for the CUDA library headers the toolkit lacks: ([] when it has them
    all, None when some are nowhere), and the headers still missing."""
    toolkit_include = os.path.join(toolkit, "include")
    missing = [h for h in CUDA_LIBRARY_HEADERS if not os.path.isfile(os.path.join(toolkit_include, h))]
    extra = []
    for header in list(missing):
        for folder in _nvidia_wheel_include_dirs():
            if os.path.isfile(os.path.join(folder, header)):
                missing.remove(header)
                if folder not in extra:
                    extra.append(folder)
                break
    return (None if missing else extra), missing


def cuda_setup() -> tuple[Optional[str], list[str]]:
    """(toolkit, extra library include folders) when the CUDA kernels are to be built, else (None, [])."""
    import torch

    flag = os.environ.get("PYCOMM_CUDA")
    if flag == "0":
        return None, []
    problem = None
    toolkit, extra = None, []
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} has no CUDA (install a CUDA build of torch)"
    else:
        toolkit, looked = find_cuda_toolkit()
        if toolkit is None:
            problem = "no CUDA toolkit found: looked at " + "; ".join(looked)
        else:
            extra, missing = find_library_headers(toolkit)
            if extra is None:
                problem = (f"CUDA library headers {', '.join(missing)} are neither in {toolkit}/include nor in "
                           f"torch's nvidia wheels ({', '.join(_nvidia_wheel_include_dirs()) or 'none found'})")
    if problem:
        if flag == "1":
            raise RuntimeError(f"PYCOMM_CUDA=1 but {problem}")
        print(f"pycomm: building the CPU kernels only: {problem}", file=sys.stderr)
        return None, []
    return toolkit, extra


def openmp_flags() -> list[str]:
    """``["-fopenmp"]`` when the C++ compiler (``$CXX``, else Python's) compiles and links an OpenMP
    program, else ``[]``: the CPU kernels then run single-threaded, and a line says so."""
    compiler = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "openmp_probe.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            probe = subprocess.run(compiler + ["-fopenmp", source, "-o", os.path.join(folder, "probe")],
                                   capture_output=True, timeout=120)
            if probe.returncode == 0:
                return ["-fopenmp"]
        except (OSError, subprocess.SubprocessError):
            pass
    print(f"pycomm: {' '.join(compiler)} does not build OpenMP programs: the CPU kernels run single-threaded",
          file=sys.stderr)
    return []


def extension():
    toolkit, library_includes = cuda_setup()
    if toolkit:
        # torch reads CUDA_HOME when its build helpers are imported (and points it at the folder above
        # `nvcc`, which for a wrapper script is not a toolkit): set it first, and patch a prior import.
        os.environ["CUDA_HOME"] = toolkit
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include = [os.path.join(ROOT, "csrc", "include")]
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -ffp-contract=off: the CPU must round exactly like the GPU (no FMA fusion).
    openmp = openmp_flags()
    cxx = ["-O3", "-ffp-contract=off", "-std=c++17"] + openmp
    werror = os.environ.get("PYCOMM_WERROR") == "1"
    system_includes = cpp_extension.include_paths(device_type="cuda" if toolkit else "cpu")
    if werror:
        # -isystem overrides the -I that torch adds for the same folders: warnings count only in pycomm's files.
        cxx += ["-Wall", "-Wextra", "-Werror"] + [f for d in system_includes for f in ("-isystem", d)]
    if toolkit:
        cpp_extension.CUDA_HOME = toolkit
        # After the toolkit's own headers, so that the wheel's copies of the runtime headers never win.
        cxx += [f for d in library_includes for f in ("-idirafter", d)]
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
        # --fmad=false: no FMA contraction, so device rounding matches the CPU.
        nvcc = ["-O3", "-std=c++17", "--fmad=false", "-DPYCOMM_WITH_CUDA"]
        if werror:  # the .cu files include only CUDA and CUB headers
            nvcc += ["--Werror=all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror"]
        print(f"pycomm: building the CUDA kernels with the toolkit in {toolkit}"
              + (f" and library headers from {', '.join(library_includes)}" if library_includes else ""),
              file=sys.stderr)
        return CUDAExtension(
            "pycomm._C", sources, include_dirs=include,
            extra_compile_args={"cxx": cxx + ["-DPYCOMM_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=openmp,
        ), BuildExtension
    return CppExtension("pycomm._C", sources, include_dirs=include, extra_compile_args={"cxx": cxx},
                        extra_link_args=openmp), BuildExtension


if __name__ == "__main__":
    from setuptools import setup

    ext, build_ext = extension()
    # Name, version, packages and the rest of the metadata are in pyproject.toml.
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": build_ext.with_options(no_python_abi_suffix=False)},
        # PYCOMM_BUILD_BASE keeps a second build (the CUDA one of `make cuda-build`) from sharing
        # object files with the development build in build/.
        options={"build": {"build_base": os.environ["PYCOMM_BUILD_BASE"]}} if os.environ.get("PYCOMM_BUILD_BASE") else {},
    )

"""setup.py finds a CUDA toolkit the way a GPU user's machine has it, and says what it looked for.

Fake toolkits in temporary folders stand in for real ones: a toolkit is a folder with bin/nvcc and
include/cuda_runtime_api.h; a wrapper nvcc is a script elsewhere that execs the real one.
"""

import importlib.util
import os
import stat
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("pycomm_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the setup() call runs only under __main__
    return module


def _script(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def make_toolkit(root, library_headers=()) -> str:
    """A fake toolkit whose nvcc answers --dryrun the way the real one does (`#$ _HERE_=<root>/bin`)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").write_text("")
    for header in library_headers:
        (root / "include" / header).write_text("")
    _script(root / "bin" / "nvcc", f'#!/bin/sh\necho "#$ _NVVM_BRANCH_=nvvm" >&2\necho "#$ _HERE_={root}/bin" >&2\n')
    return str(root)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("CUDA_HOME", "CUDA_PATH", "PYCOMM_CUDA"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return monkeypatch


def test_cuda_home_wins(setup_py, clean_env, tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-x")
    clean_env.setenv("CUDA_HOME", toolkit)
    assert setup_py.find_cuda_toolkit()[0] == toolkit


def test_cuda_path_when_cuda_home_is_unset(setup_py, clean_env, tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-y")
    clean_env.setenv("CUDA_PATH", toolkit)
    assert setup_py.find_cuda_toolkit()[0] == toolkit


def test_wrapper_nvcc_leads_to_the_toolkit_it_runs(setup_py, clean_env, tmp_path):
    toolkit = make_toolkit(tmp_path / "real" / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    # As on the project's machines: /usr/local/bin/nvcc is `exec <toolkit>/bin/nvcc "$@"`, so the folder
    # above the wrapper (what torch would take as CUDA_HOME) has no CUDA headers.
    _script(wrappers / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    clean_env.setenv("PATH", str(wrappers))
    found, _ = setup_py.find_cuda_toolkit()
    assert found == toolkit
    assert os.path.dirname(str(wrappers)) != found


def test_a_cuda_home_that_is_no_toolkit_is_named(setup_py, clean_env, tmp_path):
    clean_env.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    clean_env.setattr(setup_py.glob, "glob", lambda pattern: [])
    clean_env.setattr(setup_py, "_is_toolkit", lambda path: False)
    found, looked = setup_py.find_cuda_toolkit()
    assert found is None
    text = "; ".join(looked)
    assert f"CUDA_HOME={tmp_path / 'nowhere'}" in text and "nvcc on the PATH (none)" in text
    assert "/usr/local/cuda" in text


def test_library_headers_from_torchs_nvidia_wheels(setup_py, clean_env, tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda")          # the runtime's headers only, no cuBLAS/cuSPARSE
    site = tmp_path / "site"
    wheel_include = site / "nvidia" / "cu13" / "include"
    wheel_include.mkdir(parents=True)
    for header in setup_py.CUDA_LIBRARY_HEADERS:
        (wheel_include / header).write_text("")
    clean_env.setattr(sys, "path", [str(site)])
    extra, missing = setup_py.find_library_headers(toolkit)
    assert extra == [os.path.realpath(wheel_include)] and missing == []


def test_toolkit_with_library_headers_needs_nothing_else(setup_py, clean_env, tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda", library_headers=setup_py.CUDA_LIBRARY_HEADERS)
    clean_env.setattr(sys, "path", [])
    assert setup_py.find_library_headers(toolkit) == ([], [])


def test_missing_library_headers_are_named(setup_py, clean_env, tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda", library_headers=("cublas_v2.h", "cublasLt.h"))
    clean_env.setattr(sys, "path", [])
    assert setup_py.find_library_headers(toolkit) == (None, ["cusparse.h", "cusolverDn.h"])


def test_forced_cuda_fails_loudly_in_one_line(setup_py, clean_env, tmp_path):
    clean_env.setenv("PYCOMM_CUDA", "1")
    clean_env.setattr(setup_py, "find_cuda_toolkit", lambda: (None, ["nvcc on the PATH (none)"]))
    clean_env.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(RuntimeError, match=r"^PYCOMM_CUDA=1 but no CUDA toolkit found: looked at nvcc on the PATH \(none\)$"):
        setup_py.cuda_setup()


def test_forced_cuda_with_a_cpu_torch_fails(setup_py, clean_env):
    clean_env.setenv("PYCOMM_CUDA", "1")
    clean_env.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="has no CUDA"):
        setup_py.cuda_setup()


def test_auto_falls_back_to_cpu_and_says_why(setup_py, clean_env, capsys):
    clean_env.setattr(setup_py, "find_cuda_toolkit", lambda: (None, ["nvcc on the PATH (none)"]))
    clean_env.setattr(torch.version, "cuda", "13.0")
    assert setup_py.cuda_setup() == (None, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pycomm: building the CPU kernels only: no CUDA toolkit found: looked at nvcc on the PATH (none)"]


def test_disabled_cuda_looks_for_nothing(setup_py, clean_env):
    clean_env.setenv("PYCOMM_CUDA", "0")
    clean_env.setattr(setup_py, "find_cuda_toolkit", lambda: pytest.fail("must not look"))
    assert setup_py.cuda_setup() == (None, [])


def test_openmp_when_the_compiler_builds_an_openmp_program(setup_py, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    assert setup_py.openmp_flags() == ["-fopenmp"]  # this machine's g++ has libgomp


def test_no_openmp_flag_for_a_compiler_without_it(setup_py, monkeypatch, tmp_path, capsys):
    # A compiler that rejects -fopenmp (e.g. Apple clang without libomp): build single-threaded, and say so.
    compiler = _script(tmp_path / "cxx", '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexit 0\n')
    monkeypatch.setenv("CXX", compiler)
    assert setup_py.openmp_flags() == []
    assert "does not build OpenMP programs: the CPU kernels run single-threaded" in capsys.readouterr().err

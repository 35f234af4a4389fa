"""``make gpu-check``: verify pycomm on a machine with a CUDA GPU, in one short time slot.

Usage::

    make gpu-check OUT=gpu-check-out              # PYTHON=python3 by default
    python3 bench/gpu_check.py --out DIR [--budget-s 480] [--stages build,cuda-tests]

It uses the machine's own Python, torch, nvcc, pytest and pytest-benchmark: it creates no
virtual environment, installs nothing and needs no network. Stages, in order; each is timed,
its output goes to ``DIR/<stage>.log``, and each runs even when an earlier one failed:

1. ``environment``: Python, torch and its CUDA version, the GPU's name and compute capability,
   nvcc's path and version, ``CUDA_HOME``, CPU cores. No visible GPU fails this stage and
   skips the GPU stages below.
2. ``build``: ``PYCOMM_CUDA=1 python setup.py build_ext --inplace`` with
   ``TORCH_CUDA_ARCH_LIST`` set to this GPU's capability only (one architecture builds fastest)
   and ``MAX_JOBS`` = the CPU cores. The extension lands in the checkout (``pycomm/_C*.so``);
   later stages import it with ``PYTHONPATH`` set to the checkout, so nothing is installed.
3. ``registration``: ``pycomm.kernels.missing_cuda_kernels()`` must be empty.
4. ``cuda-tests``: pytest on every test that carries ``cuda_support.REQUIRES_CUDA`` (the
   files that import ``cuda_support``, filtered by ``bench/cuda_only_plugin.py``) except the
   multi-process training tests: CPU/CUDA bit identity of every op, and the no-host-sync checks
   under ``torch.cuda.set_sync_debug_mode("error")`` (ops and every hook,
   ``tests/hooks/test_hooks_cuda.py``).
5. ``hooks-one-gpu``: ``tests/hooks/test_hooks_cuda.py -k on_one_gpu``: each method trains a small
   model at W = 2 and 4, every rank a process on ``cuda:0``, over Gloo (NCCL cannot put two
   ranks on one GPU; that file's docstring says what Gloo takes and what this cannot catch).
   Rank 0's losses land in ``DIR/hooks_training.json``.
6. ``benchmarks``: ``pytest bench --benchmark-only -k cuda`` (the GPU kernels only: the CPU
   ones would take the slot), then the ratios of ``bench/ratios.py`` to the device-to-device
   copy (``clone()``) and to the pure-torch baselines, from the same run.

Then ``DIR/summary.md`` and ``DIR/summary.json``: each stage's status (``ok``, ``failed``,
``timeout`` or ``skipped``, with the reason), its duration and key numbers (test counts, the
failing tests, the benchmark ratios), and the environment. The exit code is 0 only when
every stage (of those selected with ``--stages``) is ``ok``; 2 for bad arguments.

Time: the whole run fits in ``--budget-s`` (default 480 s, 8 minutes). Each stage gets a
share of what is left (by its weight in ``STAGES``), so time a stage does not use goes to
the later ones. A stage that runs out is sent SIGINT (pytest then still writes its JUnit
report and benchmark JSON for what ran), killed a few seconds later with its whole process
group, and reported as ``timeout``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 480.0
MIN_STAGE_S = 5.0  # a stage with less time left than this is skipped, not started
TRAINING_TESTS = "on_one_gpu"  # -k expression of test_hooks_cuda.py's multi-process tests
EXPLICIT_CUDA_TEST_FILES = ("tests/ops/test_cuda_ops.py", "tests/ops/test_dgc_cuda.py", "tests/ops/test_philox_cuda.py",
                            "tests/ops/test_codec.py")

OK, FAILED, TIMEOUT, SKIPPED = "ok", "failed", "timeout", "skipped"
NOT_SELECTED = "not selected (--stages)"


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------

@dataclass
class CommandOutcome:
    """How a command ended: its exit code (None when it was killed) and whether it ran out of time."""

    returncode: Optional[int]
    timed_out: bool
    duration_s: float


CommandRunner = Callable[[Sequence[str], str, float, Optional[dict], Optional[str]], CommandOutcome]


def run_command(argv: Sequence[str], log_path: str, timeout_s: float, env: Optional[dict] = None,
                cwd: Optional[str] = None) -> CommandOutcome:
    """Run ``argv`` with stdout and stderr appended to ``log_path``, for at most ``timeout_s``.

    At the limit, minus a grace of up to 10 s, the command's process group gets SIGINT (pytest
    then writes its reports); at the limit it gets SIGKILL. Children (e.g. spawned ranks) are in
    the same group, so nothing outlives the stage.
    """
    start = time.monotonic()
    grace = min(10.0, 0.2 * timeout_s)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            return CommandOutcome(proc.wait(timeout=max(timeout_s - grace, 0.0)), False, time.monotonic() - start)
        except subprocess.TimeoutExpired:
            pass
        for sig, wait_s in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        log.write(f"\n[gpu-check: stopped after {time.monotonic() - start:.1f} s, the stage's limit]\n".encode())
    return CommandOutcome(None, True, time.monotonic() - start)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

@dataclass
class StageResult:
    """One stage's outcome, as the summary shows it."""

    name: str
    status: str                    # ok, failed, timeout or skipped
    duration_s: float = 0.0
    reason: str = ""               # why it failed, timed out or was skipped
    log: str = ""                  # its log file, relative to the output folder
    details: dict = field(default_factory=dict)


@dataclass
class Context:
    """What the stages share: where to write, how to run commands, what earlier stages learnt."""

    out_dir: str
    runner: CommandRunner = run_command
    python: str = sys.executable
    root: str = ROOT
    environment: dict = field(default_factory=dict)

    def log_path(self, stage: str) -> str:
        return os.path.join(self.out_dir, f"{stage}.log")

    def env(self, **extra: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.root, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def run(self, stage: str, argv: Sequence[str], timeout_s: float, **extra_env: str) -> CommandOutcome:
        return self.runner(argv, self.log_path(stage), timeout_s, self.env(**extra_env), self.root)


# A stage function returns (status, reason, details); the runner adds the name, time and log.
StageFn = Callable[[Context, float], tuple]


@dataclass
class Stage:
    name: str
    fn: StageFn
    weight: float           # its share of the remaining budget, against the later stages' weights
    needs_gpu: bool = True


def command_status(outcome: CommandOutcome, what: str) -> tuple[str, str]:
    if outcome.timed_out:
        return TIMEOUT, f"{what} stopped at the stage's time limit ({outcome.duration_s:.0f} s)"
    if outcome.returncode != 0:
        return FAILED, f"{what} exited with code {outcome.returncode}"
    return OK, ""


ENVIRONMENT_PROBE = r"""
import json, os, platform, shutil, subprocess
info = {"python": platform.python_version(), "cpu_cores": os.cpu_count(), "nvcc": shutil.which("nvcc") or "",
        "CUDA_HOME": os.environ.get("CUDA_HOME", "")}
if info["nvcc"]:
    try:
        out = subprocess.run([info["nvcc"], "--version"], capture_output=True, text=True, timeout=30).stdout
        info["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else ""
    except Exception as e:
        info["nvcc_version"] = f"? ({e})"
import torch
info["torch"] = torch.__version__
info["torch_cuda"] = torch.version.cuda or ""
info["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
if info["gpu_count"]:
    major, minor = torch.cuda.get_device_capability(0)
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = f"{major}.{minor}"
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
try:
    from torch.utils.cpp_extension import CUDA_HOME
    info["torch_CUDA_HOME"] = CUDA_HOME or ""
except Exception as e:
    info["torch_CUDA_HOME"] = f"? ({e})"
print("GPU_CHECK_JSON " + json.dumps(info))
"""


def read_marked_json(path: str, marker: str) -> Optional[dict]:
    """The JSON after the last line starting with ``marker`` in a log, or None."""
    try:
        with open(path, errors="replace") as f:
            lines = [line for line in f if line.startswith(marker)]
    except OSError:
        return None
    return json.loads(lines[-1][len(marker):]) if lines else None


def stage_environment(ctx: Context, timeout_s: float) -> tuple:
    outcome = ctx.run("environment", [ctx.python, "-c", ENVIRONMENT_PROBE], timeout_s)
    status, reason = command_status(outcome, "the environment probe")
    info = read_marked_json(ctx.log_path("environment"), "GPU_CHECK_JSON ") or {}
    ctx.environment.update(info)
    if status == OK and not info.get("gpu_count"):
        status, reason = FAILED, "torch sees no CUDA GPU on this machine"
    return status, reason, {}


def stage_build(ctx: Context, timeout_s: float) -> tuple:
    arch = ctx.environment.get("capability", "")
    jobs = str(ctx.environment.get("cpu_cores") or os.cpu_count() or 1)
    extra = {"PYCOMM_CUDA": "1", "MAX_JOBS": jobs}
    if arch:
        extra["TORCH_CUDA_ARCH_LIST"] = arch
    outcome = ctx.run("build", [ctx.python, "setup.py", "build_ext", "--inplace"], timeout_s, **extra)
    status, reason = command_status(outcome, "the CUDA build")
    return status, reason, {"TORCH_CUDA_ARCH_LIST": arch or "(torch's default)", "MAX_JOBS": jobs}


REGISTRATION_PROBE = r"""
import json
from pycomm import kernels
print("GPU_CHECK_JSON " + json.dumps({"ops": len(kernels.pycomm_ops()), "missing": kernels.missing_cuda_kernels()}))
"""


def stage_registration(ctx: Context, timeout_s: float) -> tuple:
    outcome = ctx.run("registration", [ctx.python, "-c", REGISTRATION_PROBE], timeout_s)
    status, reason = command_status(outcome, "import pycomm")
    found = read_marked_json(ctx.log_path("registration"), "GPU_CHECK_JSON ") or {}
    if status == OK and found.get("missing"):
        status, reason = FAILED, f"no CUDA kernel for {', '.join(found['missing'])}"
    return status, reason, found


def cuda_test_files(root: str) -> list[str]:
    """The explicit CUDA test files plus every test file that imports ``cuda_support``."""
    files = list(EXPLICIT_CUDA_TEST_FILES)
    tests = os.path.join(root, "tests")
    for folder, _, names in sorted(os.walk(tests)):  # tests/ mirrors the package: ops/, hooks/, ...
        for name in sorted(names):
            if name.startswith("test_") and name.endswith(".py"):
                with open(os.path.join(folder, name), errors="replace") as f:
                    if re.search(r"^\s*(from cuda_support import|import cuda_support)", f.read(), re.MULTILINE):
                        files.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return [f for f in dict.fromkeys(files) if os.path.exists(os.path.join(root, f))]


def parse_junit(path: str, max_names: int = 50) -> dict:
    """Counts and failing test names of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    skip_reasons: dict[str, int] = {}
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
            if case.find("failure") is not None:
                counts["failed"] += 1
                failing.append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                failing.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                message = case.find("skipped").get("message", "")
                skip_reasons[message] = skip_reasons.get(message, 0) + 1
            else:
                counts["passed"] += 1
    details: dict[str, Any] = dict(counts)
    details["failing"] = failing[:max_names]
    if len(failing) > max_names:
        details["failing_not_listed"] = len(failing) - max_names
    if skip_reasons:
        details["skip_reasons"] = dict(sorted(skip_reasons.items()))
    return details


def pytest_stage(ctx: Context, stage: str, args: Sequence[str], timeout_s: float, **extra_env: str) -> tuple:
    junit = os.path.join(ctx.out_dir, f"{stage}.xml")
    if os.path.exists(junit):
        os.remove(junit)
    argv = [ctx.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    outcome = ctx.run(stage, argv, timeout_s, **extra_env)
    status, reason = command_status(outcome, "pytest")
    details: dict[str, Any] = {}
    if os.path.exists(junit):
        try:
            details = parse_junit(junit)
        except ET.ParseError as e:
            details = {"junit_error": str(e)}
    elif status == OK:
        status, reason = FAILED, "pytest wrote no JUnit report"
    if status == OK and details.get("tests", 0) and details.get("skipped") == details.get("tests"):
        status, reason = FAILED, "every test was skipped"
    elif status == OK and not details.get("tests"):
        status, reason = FAILED, "no test ran"
    elif status == FAILED and (details.get("failed") or details.get("errors")):
        reason = f"{details.get('failed', 0)} failed, {details.get('errors', 0)} errors"
    return status, reason, details


def stage_cuda_tests(ctx: Context, timeout_s: float) -> tuple:
    files = cuda_test_files(ctx.root)
    return pytest_stage(ctx, "cuda-tests", ["-p", "cuda_only_plugin", "-k", f"not {TRAINING_TESTS}", *files],
                        timeout_s, PYTHONPATH=os.pathsep.join([ctx.root, os.path.join(ctx.root, "bench")]))


def stage_hooks(ctx: Context, timeout_s: float) -> tuple:
    record = os.path.join(ctx.out_dir, "hooks_training.json")
    if os.path.exists(record):
        os.remove(record)
    status, reason, details = pytest_stage(ctx, "hooks-one-gpu", ["tests/hooks/test_hooks_cuda.py", "-k", TRAINING_TESTS],
                                           timeout_s, PYCOMM_GPU_CHECK_OUT=os.path.abspath(ctx.out_dir))
    if os.path.exists(record):
        with open(record) as f:
            details["rank0_losses"] = json.load(f)
    return status, reason, details


def load_ratios_module(root: str):
    spec = importlib.util.spec_from_file_location("pycomm_bench_ratios", os.path.join(root, "bench", "ratios.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_benchmarks(ctx: Context, timeout_s: float) -> tuple:
    result_json = os.path.join(ctx.out_dir, "benchmarks.json")
    if os.path.exists(result_json):
        os.remove(result_json)
    argv = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench", "--benchmark-only",
            f"--benchmark-json={result_json}", "-k", "cuda"]
    outcome = ctx.run("benchmarks", argv, timeout_s)
    status, reason = command_status(outcome, "the benchmarks")
    details: dict[str, Any] = {}
    if os.path.exists(result_json):
        with open(result_json) as f:
            data = json.load(f)
        details["ratios"] = load_ratios_module(ctx.root).ratio_rows(data)
        with open(ctx.log_path("benchmarks"), "a") as log:
            log.write("\n" + ratio_table(details["ratios"]) + "\n")
    elif status == OK:
        status, reason = FAILED, "pytest-benchmark wrote no JSON"
    if status == OK and not details.get("ratios"):
        status, reason = FAILED, "no CUDA benchmark ran"
    return status, reason, details


STAGES = [
    # With the default 480 s: about 29 s to probe (a cold `import torch` and CUDA start-up),
    # about 220 s to build, and the rest split by weight among the test stages.
    Stage("environment", stage_environment, 0.06, needs_gpu=False),
    Stage("build", stage_build, 0.46),
    Stage("registration", stage_registration, 0.02),
    Stage("cuda-tests", stage_cuda_tests, 0.18),
    Stage("hooks-one-gpu", stage_hooks, 0.14),
    Stage("benchmarks", stage_benchmarks, 0.14),
]
STAGE_NAMES = [s.name for s in STAGES]


def run_stages(stages: Sequence[Stage], ctx: Context, budget_s: float, selected: Optional[Sequence[str]] = None,
               clock: Callable[[], float] = time.monotonic, min_stage_s: float = MIN_STAGE_S) -> list[StageResult]:
    """Run every stage in order within ``budget_s``; a failing (or raising) stage does not stop the next.

    A stage whose share of the time left is under ``min_stage_s`` is skipped."""
    start = clock()
    results: list[StageResult] = []
    for i, stage in enumerate(stages):
        log = os.path.basename(ctx.log_path(stage.name))
        if selected is not None and stage.name not in selected:
            results.append(StageResult(stage.name, SKIPPED, reason=NOT_SELECTED))
            continue
        if stage.needs_gpu and "gpu_count" in ctx.environment and not ctx.environment["gpu_count"]:
            results.append(StageResult(stage.name, SKIPPED, reason="no CUDA GPU"))
            continue
        left = budget_s - (clock() - start)
        later = sum(s.weight for s in stages[i:] if selected is None or s.name in selected)
        timeout_s = left * stage.weight / later if later > 0 else left
        if timeout_s < min_stage_s:
            results.append(StageResult(stage.name, SKIPPED, reason=f"time budget spent ({max(left, 0):.0f} s left)"))
            continue
        began = clock()
        try:
            status, reason, details = stage.fn(ctx, timeout_s)
        except Exception:
            status, reason, details = FAILED, "gpu-check's own code raised: " + traceback.format_exc(limit=3), {}
            with open(ctx.log_path(stage.name), "a") as f:
                f.write(traceback.format_exc())
        details = {"time_limit_s": round(timeout_s, 1), **details}
        results.append(StageResult(stage.name, status, clock() - began, reason,
                                   log if os.path.exists(ctx.log_path(stage.name)) else "", details))
    return results


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

def ratio_table(rows: Sequence[dict]) -> str:
    lines = ["| group | kernel | median ms | / device copy (clone) | speed-up vs pure torch |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs_clone']:.2f}x" if r.get("vs_clone") is not None else ""
        speedup = f"{r['speedup_vs_torch']:.1f}x" if r.get("speedup_vs_torch") is not None else ""
        lines.append(f"| {r['group']} | {r['kernel']} | {r['median_s'] * 1e3:.3f} | {ratio} | {speedup} |")
    return "\n".join(lines)


def overall_ok(results: Sequence[StageResult]) -> bool:
    """Every stage ok, except those left out with --stages (at least one ran)."""
    ran = [r for r in results if not (r.status == SKIPPED and r.reason == NOT_SELECTED)]
    return bool(ran) and all(r.status == OK for r in ran)


def summary_json(results: Sequence[StageResult], environment: dict, started: str, budget_s: float) -> dict:
    return {"ok": overall_ok(results), "started": started, "budget_s": budget_s,
            "duration_s": round(sum(r.duration_s for r in results), 1), "environment": environment,
            "stages": [{**dataclasses.asdict(r), "duration_s": round(r.duration_s, 1)} for r in results]}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def summary_markdown(results: Sequence[StageResult], environment: dict, started: str, budget_s: float) -> str:
    total = sum(r.duration_s for r in results)
    out = [f"# pycomm gpu-check: {'OK' if overall_ok(results) else 'FAILED'}", "",
           f"Started {started}; {total:.1f} s of a {budget_s:.0f} s budget.", "", "## Environment", "",
           "| | |", "|---|---|"]
    out += [f"| {k} | {_cell(v)} |" for k, v in environment.items()]
    out += ["", "## Stages", "", "| stage | status | time (s) | limit (s) | notes | log |",
            "|---|---|---:|---:|---|---|"]
    for r in results:
        limit = r.details.get("time_limit_s", "")
        out.append(f"| {r.name} | {r.status} | {r.duration_s:.1f} | {limit} | {_cell(r.reason)} | {r.log} |")
    for r in results:
        section = []
        if "tests" in r.details:
            d = r.details
            section.append(f"{d['passed']} passed, {d['failed']} failed, {d['errors']} errors, "
                           f"{d['skipped']} skipped, of {d['tests']}.")
            if d.get("failing"):
                section += ["", "Failing:", ""] + [f"- `{name}`" for name in d["failing"]]
                if d.get("failing_not_listed"):
                    section.append(f"- and {d['failing_not_listed']} more")
            if d.get("skip_reasons"):
                section += ["", "Skipped:", ""] + [f"- {n} x {_cell(m)}" for m, n in d["skip_reasons"].items()]
        if r.details.get("missing"):
            section.append("Missing CUDA kernels: " + ", ".join(f"`{m}`" for m in r.details["missing"]))
        if r.details.get("rank0_losses"):
            section += ["", "Rank 0's losses (first -> last), or the error:", ""]
            for world, runs in r.details["rank0_losses"].items():
                for key, value in (runs.items() if isinstance(runs, dict) else []):
                    if isinstance(value, list) and value:
                        section.append(f"- W={world} {key}: {value[0]:.4g} -> {value[-1]:.4g}")
                    else:
                        section.append(f"- W={world} {key}: {_cell(str(value))[-300:]}")
        if r.details.get("ratios"):
            section.append(ratio_table(r.details["ratios"]))
        if section:
            out += ["", f"## {r.name}", ""] + section
    return "\n".join(out) + "\n"


def write_summary(out_dir: str, results: Sequence[StageResult], environment: dict, started: str,
                  budget_s: float) -> None:
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary_json(results, environment, started, budget_s), f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(results, environment, started, budget_s))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the budget must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < MIN_STAGE_S:
        raise argparse.ArgumentTypeError(f"the budget must be a finite number of seconds >= {MIN_STAGE_S:g}, "
                                         f"got {text!r}")
    return value


def _stage_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or '(none given)'}; "
                                         f"stages: {', '.join(STAGE_NAMES)}")
    return names


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--budget-s", type=_budget, default=DEFAULT_BUDGET_S,
                        help=f"time budget of the whole run in seconds (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--stages", type=_stage_list, default=None,
                        help=f"comma-separated subset of: {', '.join(STAGE_NAMES)} (default: all)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} exists and is not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot create the output folder {args.out!r}: {e}")
    if not os.access(args.out, os.W_OK | os.X_OK):
        parser.error(f"the output folder {args.out!r} is not writable")
    return args


def main(argv: Optional[Sequence[str]] = None, stages: Sequence[Stage] = STAGES,
         runner: CommandRunner = run_command) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    ctx = Context(out_dir=args.out, runner=runner)
    results = run_stages(stages, ctx, args.budget_s, args.stages)
    write_summary(args.out, results, ctx.environment, started, args.budget_s)
    for r in results:
        print(f"{r.name:15} {r.status:8} {r.duration_s:7.1f} s  {' '.join(r.reason.split())[:150]}")
    ok = overall_ok(results)
    print(f"gpu-check {'OK' if ok else 'FAILED'}: {os.path.join(args.out, 'summary.md')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

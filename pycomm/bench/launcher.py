"""The harness side of a run: launcher processes and their pools, signals, hang detection and
failure reasons.

The harness starts ``python -m pycomm.bench.launcher --launch SPEC`` in a new session; that
launcher forks (or, for NCCL, spawns) the workers of :mod:`pycomm.bench.worker`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from pycomm.bench.config import BenchConfig
from pycomm.bench.methods import MethodSpec
from pycomm.bench.netns import ShapedNamespace
from pycomm.bench.worker import free_port, worker_main

logger = logging.getLogger(__name__)


def _launch(spec_path: str) -> int:
    """One launcher process: start the workers, which run the methods in turn, and wait (a worker failure raises)."""
    import torch.multiprocessing as mp

    with open(spec_path, "rb") as fh:
        cfg, methods, run_dir, measure_wire, log_level = pickle.load(fh)
    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(levelname)s launcher %(name)s: %(message)s")
    # fork: no second import of torch per worker; CUDA must not be initialised before a fork, so NCCL spawns
    start_method = "spawn" if cfg.resolved_backend == "nccl" else "fork"
    mp.start_processes(worker_main, args=(cfg.workers, free_port(), cfg, methods, run_dir, measure_wire, log_level),
                       nprocs=cfg.workers, join=True, start_method=start_method)
    return 0


@contextlib.contextmanager
def signals_raise_keyboard_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt (like Ctrl-C), so that clean-up in ``finally`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Terminate, then kill, the launcher's whole process group (its workers included)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the launcher is gone; its workers may outlive it for a moment
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.:]*(Error|Exception|Interrupt|EnforceNotMet)\b.*)$")
_ABORT_LINE = re.compile(r"^\s*((terminate called|  what\(\)).*)$")


def _failure_reason(log_text: str, returncode: Optional[int]) -> str:
    """The most telling lines of a failed launcher's output: the worker's exception (or C++ abort message)."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    errors = [m.group(1) for line in lines if (m := _ERROR_LINE.match(line))]
    aborts = [m.group(1).strip() for line in lines if (m := _ABORT_LINE.match(line))]
    # torch.multiprocessing wraps a worker's exception; the innermost line names the real one
    interesting = [e for e in errors if not e.startswith("torch.multiprocessing")]
    tail = (interesting or errors or lines[-1:] or ["no output"])[-1]
    if aborts and not interesting:  # a worker died on a C++ exception: say which, then how the launcher saw it
        tail = f"{' '.join(aborts[-2:])} ({tail})"
    return f"worker crashed (exit code {returncode}): {tail[:500]}"


def unavailable_reason(spec: MethodSpec) -> Optional[str]:
    """Why ``spec`` cannot run in this build (its own check, pycomm not importable, its method not registered),
    or None."""
    if spec.unavailable is not None and (reason := spec.unavailable()) is not None:
        return reason
    if not spec.needs_pycomm:
        return None
    try:
        import pycomm
    except ImportError as e:  # the extension failed to build or load
        return f"pycomm not importable: {e}"
    if spec.pycomm_name is not None and spec.pycomm_name not in pycomm.available_methods():
        return f"pycomm method {spec.pycomm_name!r} is not registered in this build"
    return None


def empty_result(name: str, spec: MethodSpec, cfg: BenchConfig, status: str, reason: str) -> dict[str, Any]:
    """A result row with every measurement None, for a method that ``status`` (failed, unavailable) for ``reason``."""
    return {
        "method": name, "description": spec.description, "status": status, "reason": reason,
        "optimizer": spec.optimizer, "lr": spec.base_lr(cfg), "eps": spec.eps if spec.zeroth_order else None,
        "workers": cfg.workers, "steps": cfg.steps, "step_time_s": None, "bytes_per_worker_per_step": None,
        "mean_bytes_per_worker_per_step": None, "wire_bytes_per_worker_per_step": None,
        "mean_wire_bytes_per_worker_per_step": None,
        "fp32_allreduce_bytes_per_step": None, "compression_ratio": None, "initial_loss": None, "final_loss": None,
        "eval_loss": None, "eval_accuracy": None, "collective_calls_per_step": None, "wall_s": None,
        "replicas_in_sync": None, "loss_curve": [], "step_time_curve_s": [], "bytes_curve": [],
    }


def _read_progress(path: str) -> tuple[int, int, float]:
    """Method index, steps done and their total time, from rank 0's progress file ((-1, 0, 0.0) before any)."""
    try:
        with open(path, encoding="utf-8") as fh:
            index, steps, seconds = fh.read().split()
        return int(index), int(steps), float(seconds)
    except (OSError, ValueError):
        return -1, 0, 0.0


def run_pool(pending: list[tuple[int, str, MethodSpec]], cfg: BenchConfig, net: Optional[ShapedNamespace],
             run_root: str, log_level: Optional[int],
             on_start: Callable[[int], None], on_result: Callable[[int, dict[str, Any]], None]) -> None:
    """Run the methods in worker pools: one launcher runs them in turn; a crash or a stall fails the running
    method, kills the whole pool, and a fresh pool takes the rest."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # the launcher sees this process's sys.path (as multiprocessing's spawn does), so that methods defined in
    # the caller's modules unpickle there
    paths = [package_root, *(p for p in sys.path if p), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(p for p in paths if p)))
    pending = list(pending)
    while pending:
        run_dir = tempfile.mkdtemp(prefix="pool-", dir=run_root)
        spec_path = os.path.join(run_dir, "launch.pkl")
        with open(spec_path, "wb") as fh:
            pickle.dump((cfg, pending, run_dir, net is not None, log_level), fh)
        command = (net.exec_prefix() if net is not None else []) + [
            sys.executable, "-m", "pycomm.bench.launcher", "--launch", spec_path]
        log_path = os.path.join(run_dir, "launcher.log")
        progress_path = os.path.join(run_dir, "progress")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        failure: Optional[str] = None
        try:
            on_start(pending[0][0])
            started = last_change = time.monotonic()
            seen, mean_step = 0, 0.0
            while True:
                exited = proc.poll() is not None
                while pending and os.path.exists(os.path.join(run_dir, f"result_{pending[0][0]}.json")):
                    index = pending.pop(0)[0]
                    with open(os.path.join(run_dir, f"result_{index}.json"), encoding="utf-8") as fh:
                        result = json.load(fh)
                    result["shaped"] = net is not None
                    on_result(index, result)
                    if pending:
                        on_start(pending[0][0])
                    started = last_change = time.monotonic()
                    seen, mean_step = 0, 0.0
                if exited or not pending:
                    break
                time.sleep(0.25)
                now = time.monotonic()
                index, done, seconds = _read_progress(progress_path)
                if index == pending[0][0] and done != seen:
                    seen, last_change, mean_step = done, now, seconds / max(done, 1)
                if seen == 0:
                    if now - started > cfg.start_timeout_s:
                        failure = f"no step finished within {cfg.start_timeout_s:.0f} s of the start (hung; killed)"
                        break
                    continue
                limit = max(cfg.stall_timeout_s, 3.0 * mean_step)
                if now - last_change > limit:
                    failure = f"no progress for {limit:.0f} s after step {seen} of {cfg.steps} (hung; killed)"
                    break
        finally:
            _kill_group(proc)
        if not pending:
            break
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            log_text = fh.read()
        index, name, spec = pending.pop(0)
        reason = failure or _failure_reason(log_text, proc.returncode)
        logger.info("%s failed; launcher output:\n%s", name, log_text[-4000:])
        result = empty_result(name, spec, cfg, "failed", reason)
        result["shaped"] = net is not None
        on_result(index, result)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pycomm.bench.launcher --launch SPEC``: one launcher process (started by :func:`run_pool`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--launch":
        print("usage: python -m pycomm.bench.launcher --launch SPEC (internal; run `pycomm bench e2e`)",
              file=sys.stderr)
        return 2
    return _launch(args[1])


if __name__ == "__main__":
    # run the imported module's main, so that pickles and workers see one pycomm.bench.launcher, not __main__
    from pycomm.bench.launcher import main as _module_main

    sys.exit(_module_main())

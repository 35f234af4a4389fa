"""The harness side of a run: launcher processes and their pools, signals, hang detection and
failure reasons.

The harness starts ``python -m pycomm.bench.launcher --launch SPEC`` in a new session; that
launcher forks (or, for NCCL, spawns) the workers of :mod:`pycomm.bench.worker`. On emulated nodes
(:class:`pycomm.bench.node_network.EmulatedNodes`) it starts instead one ``torchrun`` per node namespace, the way
a user launches on a cluster (:func:`torchrun_command`), each running ``python -m pycomm.bench.worker --spec SPEC``.
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
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

from pycomm.bench.config import BenchConfig
from pycomm.bench.methods import MethodSpec
from pycomm.bench.netns import ShapedNamespace
from pycomm.bench.node_network import NODE_INTERFACE, EmulatedNodes
from pycomm.bench.worker import NODE_ENV, free_port, worker_main

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
_RANK_PREFIX = re.compile(r"^\[(rank|default)\d+\]:")
_ABORT_LINE = re.compile(r"^\s*((terminate called|  what\(\)).*)$")


def _failure_reason(log_text: str, returncode: Optional[int]) -> str:
    """The most telling lines of a failed launcher's output: the worker's exception (or C++ abort message)."""
    # torchrun's workers print their tracebacks as "[rank3]: ..."
    lines = [_RANK_PREFIX.sub("", line) for line in log_text.splitlines() if line.strip()]
    errors = [m.group(1) for line in lines if (m := _ERROR_LINE.match(line))]
    aborts = [m.group(1).strip() for line in lines if (m := _ABORT_LINE.match(line))]
    # torch.multiprocessing and torchrun wrap a worker's exception; the innermost line names the real one
    interesting = [e for e in errors if not e.startswith(("torch.multiprocessing", "torch.distributed.elastic"))]
    tail = (interesting or errors or lines[-1:] or ["no output"])[-1]
    if aborts and not interesting:  # a worker died on a C++ exception: say which, then how the launcher saw it
        tail = f"{' '.join(aborts[-2:])} ({tail})"
    return f"worker crashed (exit code {returncode}): {tail[:500]}"


_CONSEQUENTIAL = re.compile(r"[Cc]onnection|closed by peer|[Tt]imed? ?out|[Bb]roken pipe|SIGTERM|SIGKILL|signal")


def _nodes_failure_reason(log_texts: Sequence[str], returncodes: Sequence[Optional[int]]) -> str:
    """The failure of a run on emulated nodes: the first node's reason that is not a consequence of another
    node's failure (a peer's lost connection, a time-out, torchrun's signal), else node 0's."""
    reasons = [_failure_reason(text, code) for text, code in zip(log_texts, returncodes)]
    first = next((r for r in reasons if not _CONSEQUENTIAL.search(r)), reasons[0])
    return first


def torchrun_command(nodes: EmulatedNodes, node: int, nproc_per_node: int, port: int, run_id: str,
                     spec_path: str) -> list[str]:
    """The command that starts node ``node``'s processes inside its namespace, as on a cluster:
    ``torchrun --nnodes N --nproc-per-node M --node-rank i --rdzv-backend c10d --rdzv-endpoint <node 0>:<port>``.

    Two settings make the c10d rendezvous work when all namespaces share one host name:
    ``--rdzv-conf is_host=1`` on node 0 only (torch otherwise decides who hosts the rendezvous store by matching
    the endpoint against the machine's host name and its addresses, and the host name resolves to 127.0.0.1
    here, so no node would host it), and ``--local-addr`` with the node's address (torch otherwise publishes
    ``socket.getfqdn()`` as MASTER_ADDR for the workers' process-group store, which the other nodes cannot
    reach). With the c10d backend the node's group rank is given by the rendezvous and may differ from
    ``--node-rank``; the workers use torchrun's RANK, and report the namespace in ``PYCOMM_BENCH_NODE``.
    """
    return ["ip", "netns", "exec", nodes.names[node], sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(nodes.nodes), "--nproc-per-node", str(nproc_per_node), "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{nodes.addresses[0]}:{port}", "--rdzv-id", run_id,
            "--rdzv-conf", f"is_host={1 if node == 0 else 0}", "--local-addr", nodes.addresses[node],
            "--max-restarts", "0", "-m", "pycomm.bench.worker", "--spec", spec_path]


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
        "mean_wire_bytes_per_worker_per_step": None, "inter_node_bytes_per_node_per_step": None,
        "mean_inter_node_bytes_per_node_per_step": None, "rank_nodes": None,
        "param_checksums": None,
        "fp32_allreduce_bytes_per_step": None, "compression_ratio": None, "initial_loss": None, "final_loss": None,
        "eval_loss": None, "eval_accuracy": None, "collective_calls_per_step": None, "wall_s": None,
        "replicas_in_sync": None, "loss_curve": [], "step_time_curve_s": [], "bytes_curve": [],
        "bytes_by_collective_per_worker_per_step": None, "bytes_by_mesh_dim_per_worker_per_step": None,
        "parallel": spec.parallel, "peak_memory_bytes": None, "peak_memory_per_rank": None,
        "peak_memory_kind": None, "start_memory_bytes": None,
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
             on_start: Callable[[int], None], on_result: Callable[[int, dict[str, Any]], None],
             nodes: Optional[EmulatedNodes] = None) -> None:
    """Run the methods in worker pools: one launcher (or, on emulated ``nodes``, one torchrun per node) runs them
    in turn; a crash or a stall fails the running method, kills the whole pool, and a fresh pool takes the rest."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # the launcher sees this process's sys.path (as multiprocessing's spawn does), so that methods defined in
    # the caller's modules unpickle there
    paths = [package_root, *(p for p in sys.path if p), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(p for p in paths if p)))
    shaped = net is not None or (nodes is not None and nodes.rate is not None)
    pending = list(pending)
    while pending:
        run_dir = tempfile.mkdtemp(prefix="pool-", dir=run_root)
        spec_path = os.path.join(run_dir, "launch.pkl")
        with open(spec_path, "wb") as fh:
            pickle.dump((cfg, pending, run_dir, net is not None or nodes is not None, log_level), fh)
        if nodes is None:
            commands = [(net.exec_prefix() if net is not None else []) + [
                sys.executable, "-m", "pycomm.bench.launcher", "--launch", spec_path]]
            envs = [env]
        else:
            port, run_id = free_port(), f"pycomm-{uuid.uuid4().hex[:8]}"
            commands = [torchrun_command(nodes, i, cfg.nproc_per_node, port, run_id, spec_path)
                        for i in range(nodes.nodes)]
            # Gloo connects over the veth; to a rank of the same node that is the node's own address, i.e. lo
            envs = [dict(env, GLOO_SOCKET_IFNAME=NODE_INTERFACE, **{NODE_ENV: str(i)}) for i in range(nodes.nodes)]
        log_paths = [os.path.join(run_dir, "launcher.log" if len(commands) == 1 else f"node{i}.log")
                     for i in range(len(commands))]
        progress_path = os.path.join(run_dir, "progress")
        procs: list[subprocess.Popen] = []
        failure: Optional[str] = None
        try:
            for command, log_path, proc_env in zip(commands, log_paths, envs):
                with open(log_path, "w", encoding="utf-8") as log:
                    procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True, env=proc_env))
            on_start(pending[0][0])
            started = last_change = time.monotonic()
            seen, mean_step = 0, 0.0
            while True:
                exited = any(proc.poll() is not None for proc in procs)
                while pending and os.path.exists(os.path.join(run_dir, f"result_{pending[0][0]}.json")):
                    index = pending.pop(0)[0]
                    with open(os.path.join(run_dir, f"result_{index}.json"), encoding="utf-8") as fh:
                        result = json.load(fh)
                    result["shaped"] = shaped
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
            for proc in procs:
                _kill_group(proc)
            if nodes is not None:  # torchrun starts its workers in sessions of their own
                nodes.kill_processes()
        if not pending:
            break
        log_texts = []
        for log_path in log_paths:
            with open(log_path, encoding="utf-8", errors="replace") as fh:
                log_texts.append(fh.read())
        log_text = "\n".join(log_texts)
        index, name, spec = pending.pop(0)
        reason = failure or (_failure_reason(log_text, procs[0].returncode) if nodes is None else
                             _nodes_failure_reason(log_texts, [proc.returncode for proc in procs]))
        logger.info("%s failed; launcher output:\n%s", name, log_text[-4000:])
        result = empty_result(name, spec, cfg, "failed", reason)
        result["shaped"] = shaped
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

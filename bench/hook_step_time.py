"""Per-step time of each pycomm DDP hook on the demo model, for several pycomm source trees in one run.

Usage::

    python bench/hook_step_time.py --tree before=/path/to/old/checkout --tree after=/path/to/new/checkout \\
        --steps 30 --repeats 3 --out bench/hook_step_time.json

Each tree is a checkout with its extension built in place (``pycomm/_C*.so``). Every measurement runs
in fresh worker processes (W=2 Gloo ranks on CPU, one intra-op thread each) whose ``PYTHONPATH`` is that
tree, so two pycomm versions never meet in one process; the workers check that they imported pycomm from
their tree. Measurements are interleaved so that drift in the machine's load hits every tree alike: for
each repeat, for each method, one launch per tree, in the order of ``--tree`` on even repeats and reversed
on odd ones (A B, B A, A B, ...).

What is timed: the demo's model (``pycomm.bench.config.MODELS["lm"]``, the CharTransformer of ``pycomm
demo``) on the demo's batches (``pycomm.bench.data``, 16 sequences of 64 bytes per rank), trained as the
demo trains it: forward, backward (with the hook), gradient clipping where the demo clips in the loop, and
the optimizer step. Each rank waits at a barrier before every step; a step's wall time is the slowest
rank's. Each rank also measures the step's process CPU time (all its threads, Gloo's included): on a
shared machine it moves much less with other processes' load than the wall time does (while a rank is
descheduled, its peer waits in a collective, which costs wall time but no CPU time). The first
``--warmup`` steps are not timed (DDP rebuilds its buckets after step 0 and quant compresses from step
2). Per (tree, method), the table gives the median wall time over all timed steps of all repeats, the
range of the per-repeat medians (the noise), the median CPU time, and each tree's ratios to the first
tree (wall median, wall mean, CPU median; the mean includes L-GreCo's solve steps, which the median skips).

Methods use only ``pycomm.register(ddp, name, **options)`` with the demo's options
(:mod:`pycomm.bench.methods`), fixed here so that every tree gets the same ones:

* ``plain``: DDP's own all-reduce (no hook), the baseline; AdamW.
* ``quant8``, ``quant4``, ``quant2``: ``quant`` at 8, 4, 2 bits; AdamW.
* ``dgc``: density 0.001, momentum 0.9, local clipping at 1.0, SGD without momentum. Unlike the demo, no
  density warm-up (``warmup_steps=0``): the timed steps measure DGC's steady state.
* ``lgreco-quant``, ``lgreco-topk``: the demo's schedule scaled to ``warmup + steps`` steps
  (``acc_steps = max(1, min(10, n // 10))``, ``start_iter = max(acc_steps + 2, n // 5)``,
  ``period = max(acc_steps, n // 4)``), so solves happen inside the timed window; topk as ``dgc``.
* ``spsa-projection``: 8 directions, no error feedback (the demo's); AdamW.
* ``spsa-projection-ef``: the same with ``error_feedback=True``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["METHOD_NAMES", "method_setup", "run_benchmark", "format_markdown", "main"]

#: The methods measured by default, in table order.
METHOD_NAMES: tuple[str, ...] = (
    "plain", "quant8", "quant4", "quant2", "dgc", "lgreco-quant", "lgreco-topk", "spsa-projection",
    "spsa-projection-ef",
)

WORLD_SIZE = 2
GRAD_CLIP = 1.0  # the demo's clipping threshold (BenchConfig.grad_clip)
PROJECTION_DIRECTIONS = 8  # the demo's spsa-projection (pycomm.bench.methods.PROJECTION_DIRECTIONS)


def _lgreco_schedule(total_steps: int) -> dict[str, int]:
    """The demo's L-GreCo schedule (pycomm.bench.methods._lgreco_options) for a run of ``total_steps``."""
    acc_steps = max(1, min(10, total_steps // 10))
    return {"acc_steps": acc_steps, "start_iter": max(acc_steps + 2, total_steps // 5),
            "period": max(acc_steps, total_steps // 4)}


def method_setup(name: str, total_steps: int) -> tuple[Optional[str], dict[str, Any], str, bool]:
    """How ``name`` is trained: ``(pycomm method or None for plain DDP, its options, optimizer, clip in hook)``.

    ``optimizer`` is ``"adamw"`` or ``"sgd"`` (no momentum: the hook keeps DGC's momentum).
    """
    dgc = {"density": 0.001, "momentum": 0.9, "warmup_steps": 0, "clip_norm": GRAD_CLIP}
    setups: dict[str, tuple[Optional[str], dict[str, Any], str, bool]] = {
        "plain": (None, {}, "adamw", False),
        "quant8": ("quant", {"bits": 8}, "adamw", False),
        "quant4": ("quant", {"bits": 4}, "adamw", False),
        "quant2": ("quant", {"bits": 2}, "adamw", False),
        "dgc": ("dgc", dgc, "sgd", True),
        "lgreco-quant": ("lgreco", {"family": "quant", **_lgreco_schedule(total_steps)}, "adamw", False),
        "lgreco-topk": ("lgreco", {"family": "topk", "momentum": 0.9, "warmup_steps": 0, "clip_norm": GRAD_CLIP,
                                   **_lgreco_schedule(total_steps)}, "sgd", True),
        "spsa-projection": ("spsa-projection", {"num_directions": PROJECTION_DIRECTIONS}, "adamw", False),
        "spsa-projection-ef": ("spsa-projection", {"num_directions": PROJECTION_DIRECTIONS, "error_feedback": True},
                               "adamw", False),
    }
    if name not in setups:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return setups[name]


# --------------------------------------------------------------------------- worker side (runs inside one tree)


def _worker(rank: int, world: int, rendezvous: str, tree: str, method: str, steps: int, warmup: int,
            result_path: str) -> None:
    """One DDP rank: train ``method`` for ``warmup + steps`` steps; rank 0 writes the timed steps as JSON."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    import pycomm
    from pycomm.bench.config import BenchConfig, MODELS
    from pycomm.bench.data import load_corpus, train_batch, train_generator

    pycomm_dir = Path(pycomm.__file__).resolve().parent
    if pycomm_dir != (Path(tree).resolve() / "pycomm"):
        raise RuntimeError(f"imported pycomm from {pycomm_dir}, not from the tree {tree}")

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        defaults = BenchConfig()
        spec = MODELS["lm"]
        total = warmup + steps
        pycomm_name, options, optimizer_name, clip_in_hook = method_setup(method, total)
        corpus = load_corpus(defaults.corpus_bytes)
        generator = train_generator(defaults.seed, rank)
        torch.manual_seed(defaults.seed)
        model = spec.build()
        ddp = DDP(model, bucket_cap_mb=defaults.bucket_cap_mb)
        state = pycomm.register(ddp, pycomm_name, **options) if pycomm_name is not None else None
        lr = spec.learning_rates[optimizer_name]
        if optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                          weight_decay=defaults.weight_decay)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=defaults.weight_decay)

        times: list[float] = []
        cpu_times: list[float] = []
        loss_value = math.nan
        for step in range(total):
            inputs, targets = train_batch(corpus, spec.batch_size, spec.context, generator)
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = model.loss_from_logits(ddp(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not clip_in_hook:
                torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if step >= warmup:
                times.append(elapsed)
                cpu_times.append(cpu)
            loss_value = float(loss.detach())
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"times": times, "cpu": cpu_times, "loss": loss_value})
        del state
        if rank == 0:
            result = {
                "step_s": [max(g["times"][s] for g in gathered) for s in range(steps)],
                "cpu_s": [sum(g["cpu"][s] for g in gathered) / world for s in range(steps)],
                "final_loss": sum(g["loss"] for g in gathered) / world,
                "pycomm_file": str(pycomm_dir),
                "torch": torch.__version__,
            }
            tmp = f"{result_path}.tmp"
            Path(tmp).write_text(json.dumps(result), encoding="utf-8")
            os.replace(tmp, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- harness side


def _launch(tree: str, method: str, steps: int, warmup: int, timeout_s: float) -> dict[str, Any]:
    """Run one measurement in ``WORLD_SIZE`` fresh processes importing pycomm from ``tree``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(tree).resolve())
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="hook_step_time_") as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        result_path = os.path.join(tmp, "result.json")
        logs = [open(os.path.join(tmp, f"rank{r}.log"), "w+", encoding="utf-8") for r in range(WORLD_SIZE)]
        # The script by path, not `-m`: its own directory (bench/) goes first on sys.path, not a pycomm tree.
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), rendezvous,
                                   tree, method, str(steps), str(warmup), result_path],
                                  env=env, stdout=logs[r], stderr=subprocess.STDOUT, cwd=tmp)
                 for r in range(WORLD_SIZE)]
        deadline = time.monotonic() + timeout_s
        reason = None
        try:
            for proc in procs:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            reason = f"timed out after {timeout_s:.0f} s"
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        codes = [proc.returncode for proc in procs]
        if reason is None and (any(codes) or not os.path.exists(result_path)):
            reason = f"worker exit codes {codes}"
        if reason is not None:
            tails = []
            for r, log in enumerate(logs):
                log.seek(0)
                tails.append(f"--- rank {r} ---\n" + "".join(log.read().splitlines(True)[-15:]))
            for log in logs:
                log.close()
            return {"status": "failed", "reason": reason, "log_tail": "\n".join(tails)}
        for log in logs:
            log.close()
        result = json.loads(Path(result_path).read_text(encoding="utf-8"))
        return {"status": "ok", **result}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [run for run in runs if run["status"] == "ok"]
    if len(ok) < len(runs):
        failed = next(run for run in runs if run["status"] != "ok")
        return {"status": "failed", "reason": failed["reason"], "log_tail": failed.get("log_tail", "")}
    pooled = [t for run in ok for t in run["step_s"]]
    repeat_medians = [statistics.median(run["step_s"]) for run in ok]
    return {
        "status": "ok",
        "median_step_s": statistics.median(pooled),
        "mean_step_s": statistics.fmean(pooled),
        "repeat_median_step_s": repeat_medians,
        "spread": (max(repeat_medians) - min(repeat_medians)) / statistics.median(repeat_medians),
        "median_cpu_s": statistics.median([c for run in ok for c in run["cpu_s"]]),
        "repeat_median_cpu_s": [statistics.median(run["cpu_s"]) for run in ok],
        "final_loss": [run["final_loss"] for run in ok],
        "step_s": [run["step_s"] for run in ok],
        "cpu_s": [run["cpu_s"] for run in ok],
    }


def run_benchmark(trees: Mapping[str, str], methods: Sequence[str] = METHOD_NAMES, *, steps: int = 30,
                  repeats: int = 3, warmup: int = 3, timeout_s: float = 600.0,
                  log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Measure every (tree, method) ``repeats`` times, interleaved, and return the report.

    Args:
        trees: label -> pycomm checkout with its extension built; the first is the reference of the ratios.
        methods: names from :data:`METHOD_NAMES`.
        steps: timed steps per measurement.
        repeats: measurements per (tree, method).
        warmup: untimed steps before them (at least 3: DDP rebuilds its buckets after step 0, quant
            compresses from step 2).
        timeout_s: longest time one measurement (one launch of the workers) may take.
        log: called with one line per measurement (None: silent).

    Returns:
        ``{"config": ..., "order": [...], "results": {tree: {method: summary}}, "ratios": {tree: {method: ...}}}``;
        a summary holds ``median_step_s``, ``mean_step_s``, ``repeat_median_step_s``, ``spread`` (range of the
        repeat medians over their median), ``median_cpu_s``, ``repeat_median_cpu_s``, ``final_loss`` and the raw
        ``step_s`` (wall time, slowest rank) and ``cpu_s`` (process CPU time, mean of the ranks) per repeat,
        or ``status: "failed"`` with the reason and the workers' last log lines. A ratio holds ``median``,
        ``mean`` (wall) and ``cpu`` (median CPU time).
    """
    if not trees:
        raise ValueError("need at least one tree")
    for label, path in trees.items():
        if not list((Path(path) / "pycomm").glob("_C*.so")):
            raise ValueError(f"tree {label}={path} has no built pycomm/_C*.so (build it with "
                             "`python setup.py build_ext --inplace`)")
    for name in methods:
        method_setup(name, warmup + steps)  # validates the name
    if steps < 1 or repeats < 1 or warmup < 3:
        raise ValueError(f"need steps >= 1, repeats >= 1 and warmup >= 3; got {steps}, {repeats}, {warmup}")
    labels = list(trees)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {label: {m: [] for m in methods} for label in labels}
    order = []
    for repeat in range(repeats):
        for method in methods:
            for label in (labels if repeat % 2 == 0 else labels[::-1]):
                run = _launch(trees[label], method, steps, warmup, timeout_s)
                runs[label][method].append(run)
                order.append([repeat, method, label])
                if log is not None:
                    figure = (f"median {1e3 * statistics.median(run['step_s']):.2f} ms/step, "
                              f"CPU {1e3 * statistics.median(run['cpu_s']):.2f} ms/step" if run["status"] == "ok"
                              else f"FAILED: {run['reason']}")
                    log(f"repeat {repeat + 1}/{repeats} {method:<19} {label:<10} {figure}")
    results = {label: {m: _summary(runs[label][m]) for m in methods} for label in labels}
    reference = results[labels[0]]
    ratios: dict[str, dict[str, Any]] = {}
    for label in labels[1:]:
        ratios[label] = {}
        for m in methods:
            a, b = reference[m], results[label][m]
            if a["status"] == b["status"] == "ok":
                ratios[label][m] = {"median": b["median_step_s"] / a["median_step_s"],
                                    "mean": b["mean_step_s"] / a["mean_step_s"],
                                    "cpu": b["median_cpu_s"] / a["median_cpu_s"]}
    return {
        "config": {"trees": dict(trees), "methods": list(methods), "steps": steps, "repeats": repeats,
                   "warmup": warmup, "world_size": WORLD_SIZE, "backend": "gloo", "threads_per_rank": 1,
                   "options": {m: method_setup(m, warmup + steps)[1] for m in methods},
                   "optimizers": {m: method_setup(m, warmup + steps)[2] for m in methods},
                   "python": sys.version.split()[0], "cpus": os.cpu_count(),
                   "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "order": order,
        "results": results,
        "ratios": ratios,
    }


def format_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown table: wall and CPU ms/step per tree, and each tree's ratios to the first tree."""
    labels = list(report["config"]["trees"])
    methods = report["config"]["methods"]
    first = labels[0]
    header = (["method"] + [f"{label} ms/step (repeats)" for label in labels]
              + [f"{label} CPU ms/step" for label in labels])
    for label in labels[1:]:
        header += [f"{label}/{first}", f"{label}/{first} mean", f"{label}/{first} CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        summaries = [report["results"][label][m] for label in labels]
        row = [m]
        for s in summaries:
            reps = s.get("repeat_median_step_s")
            row.append(f"{1e3 * s['median_step_s']:.2f} ({1e3 * min(reps):.2f}-{1e3 * max(reps):.2f})"
                       if s["status"] == "ok" else "failed")
        row += [f"{1e3 * s['median_cpu_s']:.2f}" if s["status"] == "ok" else "failed" for s in summaries]
        for label in labels[1:]:
            r = report["ratios"][label].get(m)
            row += [f"{r['median']:.3f}", f"{r['mean']:.3f}", f"{r['cpu']:.3f}"] if r else ["-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    cfg = report["config"]
    lines.append("")
    lines.append(f"W={cfg['world_size']} Gloo ranks on CPU, {cfg['threads_per_rank']} thread each; {cfg['steps']} "
                 f"timed steps after {cfg['warmup']} warm-up steps, {cfg['repeats']} repeats per (tree, method), "
                 "interleaved. ms/step: wall time of the slowest rank, median over all timed steps, in brackets the "
                 "range of the per-repeat medians; CPU ms/step: process CPU time per rank (mean of the ranks), "
                 "median over the steps; ratios: of the medians, and of the mean wall times.")
    return "\n".join(lines)


def _parse_tree(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--tree wants LABEL=PATH, got {text!r}")
    return label, path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        rank, rendezvous, tree, method, steps, warmup, result_path = argv[1:8]
        _worker(int(rank), WORLD_SIZE, rendezvous, tree, method, int(steps), int(warmup), result_path)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=_parse_tree, required=True, metavar="LABEL=PATH",
                        help="a pycomm checkout with pycomm/_C*.so built; repeat it (the first is the reference)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help=f"comma-separated, from {','.join(METHOD_NAMES)} (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per (tree, method)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 3)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one measurement may take")
    parser.add_argument("--out", help="write the JSON report there")
    args = parser.parse_args(argv)
    trees = dict(args.tree)
    if len(trees) != len(args.tree):
        parser.error("tree labels must differ")
    methods = [m for m in args.methods.split(",") if m]
    report = run_benchmark(trees, methods, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                           timeout_s=args.timeout, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(format_markdown(report))
    return 1 if any(s["status"] != "ok" for per in report["results"].values() for s in per.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

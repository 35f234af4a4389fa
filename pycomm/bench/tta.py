"""Time to accuracy: which method reaches a target loss first on a given link (``pycomm bench tta``).

The benchmark rests on one fact: a synchronous method's loss after step ``s``
does not depend on how fast the link is (the link only changes when a step
ends, not what it computes). So a run needs each method's training curve only
once, unshaped, which is fast, and each method's step time per bandwidth,
which a few steps show. Then, per method and bandwidth::

    time_to_target_s[bandwidth] = steps_to_target x step_time_s[bandwidth]

How it runs (:func:`run_tta`)
-----------------------------
1. Every method trains ``steps`` steps unshaped with the end-to-end harness
   (:func:`pycomm.bench.e2e.run_e2e`); its per-step loss curve (mean over ranks),
   median unshaped s/step and counted bytes per worker per step are kept.
2. Per bandwidth, the s/step on that link is either measured (the harness
   shapes a link where allowed: root on Linux; ``timing_steps`` steps per
   method, median over steps) or, with ``estimate=True`` or where shaping is not
   allowed, estimated as the unshaped s/step plus the link time of the counted
   bytes (:func:`estimated_step_time`). The JSON's ``config.step_time_source``
   and the table's header say which, per bandwidth.
3. The target is ``target_loss`` or, by default, :func:`default_target` of the
   ``allreduce`` row (the fp32 all-reduce baseline, then always run): its
   smoothed loss at ``fraction`` (90%) of the run. Steps to target is
   :func:`steps_to_target` on the smoothed curve, the same window for every method.

The pure functions (:func:`smooth`, :func:`default_target`,
:func:`steps_to_target`, :func:`time_to_target`, :func:`estimated_step_time`,
:func:`method_record`) hold the arithmetic; :func:`run_tta` runs the harness.

Example::

    report = run_tta(["allreduce", "quant4"], BenchConfig(workers=2, steps=200), bandwidths=["100mbit", "1gbit"],
                     estimate=True)
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence, TextIO

from pycomm.bench.config import BenchConfig
from pycomm.bench.e2e import run_e2e
from pycomm.bench.netns import parse_rate, shaping_unavailable_reason
from pycomm.bench.report import publish

__all__ = [
    "BASELINE_METHOD", "DEFAULT_FRACTION", "DEFAULT_BANDWIDTHS", "DEFAULT_TIMING_STEPS", "COMPOSITION",
    "EXTRA_LINK_TIME", "default_window", "smooth", "default_target", "steps_to_target", "time_to_target",
    "estimated_step_time", "extra_link_time", "method_record", "format_tta_table", "write_tta_plot", "run_tta",
]

logger = logging.getLogger(__name__)

#: The fp32 all-reduce baseline whose curve sets the default target.
BASELINE_METHOD: str = "allreduce"
#: The default target is the baseline's smoothed loss after this fraction of its steps.
DEFAULT_FRACTION: float = 0.9
#: Link rates of ``pycomm bench tta`` when none are named (tc syntax).
DEFAULT_BANDWIDTHS: tuple[str, ...] = ("100mbit", "1gbit", "10gbit")
#: Steps per method of each shaped timing run.
DEFAULT_TIMING_STEPS: int = 20
#: How time to target is composed (the JSON's ``config.composition`` and the table's header).
COMPOSITION: str = "time_to_target_s[bandwidth] = steps_to_target x step_time_s[bandwidth]"
#: What the composition leaves out, reported next to it (``extra_link_time_s``).
EXTRA_LINK_TIME: str = ("extra_link_time_s[bandwidth] = link time of the counted bytes that the steps before the "
                        "target sent above the run's median step (warm-ups: DGC's density stages, PowerSGD's first "
                        "uncompressed steps), at the rate of that bandwidth; not included in time_to_target_s")


def default_window(steps: int) -> int:
    """The default smoothing window of a ``steps``-long run: 10% of it, at least 1 and at most 20 steps."""
    return max(1, min(20, steps // 10))


def smooth(losses: Sequence[float], window: int) -> list[float]:
    """The trailing mean of ``losses`` over the last ``window`` values (fewer at the start).

    ``smooth(losses, w)[i]`` is the mean of ``losses[max(0, i - w + 1) : i + 1]``;
    a non-finite loss makes every mean that contains it non-finite.

    Raises:
        ValueError: ``window < 1``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out: list[float] = []
    for i in range(len(losses)):
        part = losses[max(0, i - window + 1): i + 1]
        out.append(math.fsum(part) / len(part))
    return out


def default_target(baseline_losses: Sequence[float], fraction: float = DEFAULT_FRACTION,
                   window: Optional[int] = None) -> float:
    """The baseline's smoothed loss after ``fraction`` of its steps: the default target loss.

    With ``n`` logged losses (one per step) this is ``smooth(baseline_losses,
    window)[ceil(fraction * n) - 1]``, i.e. after step ``ceil(fraction * n)``.

    Args:
        baseline_losses: the fp32 all-reduce run's loss per step.
        fraction: in (0, 1]; 0.9 by default.
        window: smoothing window; None: :func:`default_window` of the run.

    Raises:
        ValueError: an empty curve, ``fraction`` outside (0, 1], ``window < 1`` or a non-finite target.
    """
    if not baseline_losses:
        raise ValueError("the baseline has no losses: cannot set a default target")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = len(baseline_losses)
    step = max(1, math.ceil(fraction * n))
    target = smooth(baseline_losses, window if window is not None else default_window(n))[step - 1]
    if not math.isfinite(target):
        raise ValueError(f"the baseline's smoothed loss after step {step} is {target}: no target (pass one)")
    return target


def steps_to_target(losses: Sequence[float], target: float, window: int) -> Optional[int]:
    """The number of steps after which the smoothed loss first is <= ``target``; None when it never is.

    Steps count from 1: a return value of ``s`` means the smoothed loss after
    ``s`` steps (``smooth(losses, window)[s - 1]``) is the first at or below
    ``target``. Non-finite losses never reach a target.

    Raises:
        ValueError: ``window < 1`` or a non-finite target.
    """
    if not math.isfinite(target):
        raise ValueError(f"target must be finite, got {target}")
    for index, value in enumerate(smooth(losses, window)):
        if value <= target:  # False for NaN
            return index + 1
    return None


def time_to_target(steps: Optional[int], step_time_s: Mapping[str, Optional[float]]) -> dict[str, Optional[float]]:
    """Seconds to the target per bandwidth: ``steps x step_time_s[bandwidth]`` (see :data:`COMPOSITION`).

    None for a bandwidth where the target is never reached (``steps`` None) or
    the step time is unknown (the method failed on that link).
    """
    return {bandwidth: (steps * seconds if steps is not None and seconds is not None else None)
            for bandwidth, seconds in step_time_s.items()}


def estimated_step_time(unshaped_step_s: float, bytes_per_worker_per_step: float, workers: int,
                        bandwidth: str, shared_link: bool = True) -> float:
    """An estimate of a step's time on a link of ``bandwidth``: the unshaped step plus the link time of its bytes.

    ``unshaped_step_s + L x bytes_per_worker_per_step x 8 / rate``, with ``L =
    workers`` on one link shared by all workers (what the harness shapes, and
    the e2e table's ``est. link s/step``) or ``L = 1`` when every worker has a
    link of that rate of its own. It ignores latency and any overlap of
    communication with compute, and counts the unshaped run's loopback time twice.

    Raises:
        ValueError: a bad rate (tc syntax: ``100mbit``, ``1gbit``) or negative inputs.
    """
    if unshaped_step_s < 0 or bytes_per_worker_per_step < 0 or workers < 1:
        raise ValueError("step time and bytes must be >= 0 and workers >= 1")
    senders = workers if shared_link else 1
    return unshaped_step_s + senders * bytes_per_worker_per_step * 8 / parse_rate(bandwidth)


def extra_link_time(bytes_curve: Sequence[float], steps: Optional[int], bandwidths: Sequence[str], workers: int,
                    shared_link: bool = True) -> dict[str, Optional[float]]:
    """Per bandwidth, the link time of the bytes that the first ``steps`` steps sent above the median step
    (see :data:`EXTRA_LINK_TIME`): ``sum(bytes[s] - median) x L x 8 / rate`` over those steps, ``L`` as in
    :func:`estimated_step_time`. The composition times every step like the median one; a method whose early
    steps send more (a warm-up) reaches the target later than it says, by about this much. None where the
    target is not reached or no bytes were recorded."""
    if steps is None or not bytes_curve:
        return {bandwidth: None for bandwidth in bandwidths}
    ordered = sorted(bytes_curve)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    excess = sum(b - median for b in bytes_curve[:steps])
    senders = workers if shared_link else 1
    return {bandwidth: senders * excess * 8 / parse_rate(bandwidth) for bandwidth in bandwidths}


def method_record(method: str, losses: Sequence[float], target: float, window: int,
                  step_time_s: Mapping[str, Optional[float]], final_loss: Optional[float],
                  bytes_per_worker_per_step: Optional[float], *, status: str = "ok",
                  reason: Optional[str] = None, unshaped_step_time_s: Optional[float] = None,
                  bytes_curve: Sequence[float] = (), workers: int = 1, shared_link: bool = True) -> dict[str, Any]:
    """One method's JSON record.

    Fields: ``method``, ``steps_to_target`` (int or None: never),
    ``time_to_target_s`` (bandwidth -> seconds or None), ``step_time_s``
    (bandwidth -> seconds or None), ``final_loss``,
    ``bytes_per_worker_per_step``, plus ``status`` (``ok``, ``failed``,
    ``unavailable``), ``reason`` (why not ok), ``unshaped_step_time_s``,
    ``extra_link_time_s`` (:func:`extra_link_time`), ``loss_curve`` (the per-step
    losses the steps were counted on) and ``bytes_curve`` (counted bytes per worker per step).
    """
    steps = steps_to_target(losses, target, window) if status == "ok" else None
    return {
        "method": method,
        "steps_to_target": steps,
        "time_to_target_s": time_to_target(steps, step_time_s),
        "step_time_s": dict(step_time_s),
        "final_loss": final_loss,
        "bytes_per_worker_per_step": bytes_per_worker_per_step,
        "status": status,
        "reason": reason,
        "unshaped_step_time_s": unshaped_step_time_s,
        "extra_link_time_s": extra_link_time(bytes_curve, steps, list(step_time_s), workers, shared_link),
        "loss_curve": list(losses),
        "bytes_curve": list(bytes_curve),
    }


def _header(config: Mapping[str, Any]) -> str:
    bench = config["bench"]
    estimated = [bw for bw, how in config["step_time_source"].items() if how.startswith("estimate")]
    target_text = (f"target loss {config['target_loss']:.4f} ({config['target_source']})")
    lines = [
        f"**Time to accuracy**: model {bench['model']}, {bench['workers']} workers, {bench['steps']} steps, "
        f"{target_text}; losses smoothed over a trailing window of {config['window']} "
        f"step{'' if config['window'] == 1 else 's'}. "
        f"Composition: {COMPOSITION}. In brackets: {EXTRA_LINK_TIME}, shown where it is over 1% of the time.",
    ]
    for bandwidth, how in config["step_time_source"].items():
        lines.append(f"- {bandwidth}: s/step {how}")
    if estimated:
        lines.append(f"- **ESTIMATED** s/step at {', '.join(estimated)}: not measured on a shaped link.")
    return "\n".join(lines)


def format_tta_table(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table under a header that states the target, window, composition and
    how each bandwidth's s/step was obtained ("ESTIMATED" where not measured).

    Columns: method | steps to target | time to target @ each bandwidth (with its s/step) | final loss |
    bytes/worker/step. "never" where the target is not reached; failed methods get their reason.
    """
    config = report["config"]
    bandwidths = list(config["bandwidths"])
    estimated = {bw for bw, how in config["step_time_source"].items() if how.startswith("estimate")}
    cells = [f"time to target @ {bw}{' (est.)' if bw in estimated else ''}" for bw in bandwidths]
    lines = [_header(config), "",
             "| method | steps to target | " + " | ".join(cells) + " | final loss | bytes/worker/step |",
             "|---|---:|" + "---:|" * len(bandwidths) + "---:|---:|"]
    for r in report["results"]:
        if r["status"] != "ok":
            reason = " ".join(str(r["reason"]).split()).replace("|", "\\|")
            lines.append(f"| {r['method']} | {r['status']}: {reason} |" + " |" * (len(bandwidths) + 2))
            continue
        steps = r["steps_to_target"]
        row = [r["method"], "never" if steps is None else str(steps)]
        for bw in bandwidths:
            per_step = r["step_time_s"].get(bw)
            seconds = r["time_to_target_s"].get(bw)
            if per_step is None:
                row.append("- (no step time)")
            elif seconds is None:
                row.append(f"never ({per_step:.3f} s/step)")
            else:
                extra = r.get("extra_link_time_s", {}).get(bw)
                note = f" [+{extra:.1f} s]" if extra is not None and extra > 0.01 * seconds else ""
                row.append(f"{seconds:.1f} s ({per_step:.3f} s/step){note}")
        row.append("-" if r["final_loss"] is None else f"{r['final_loss']:.3f}")
        row.append("-" if r["bytes_per_worker_per_step"] is None else f"{r['bytes_per_worker_per_step']:,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_tta_plot(report: Mapping[str, Any], path: str) -> Optional[str]:
    """Plot smoothed loss against estimated wall-clock time (step x s/step), one panel per bandwidth, with the
    target as a line; return ``path``, or None without matplotlib (``pip install pycomm[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plot")
        return None
    config = report["config"]
    bandwidths = list(config["bandwidths"])
    fig, axes = plt.subplots(1, len(bandwidths), figsize=(5 * len(bandwidths), 4), squeeze=False)
    for ax, bw in zip(axes[0], bandwidths):
        for r in report["results"]:
            per_step = r["step_time_s"].get(bw) if r["status"] == "ok" else None
            if per_step is None or not r["loss_curve"]:
                continue
            curve = smooth(r["loss_curve"], config["window"])
            ax.plot([(i + 1) * per_step for i in range(len(curve))], curve, label=r["method"])
        ax.axhline(config["target_loss"], color="black", linestyle="--", linewidth=0.8, label="target")
        ax.set_xscale("log")
        ax.set_xlabel(f"estimated wall-clock time at {bw} (s)")
        ax.set_title(bw)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"training loss, trailing mean of {config['window']} steps")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _timing_runs(names: Sequence[str], cfg: BenchConfig, bandwidths: Sequence[str], timing_steps: int,
                 estimate: bool, shared_link: bool, stream: TextIO,
                 verbose: bool) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Per bandwidth, how s/step is obtained and (where measured) the shaped run's results by method."""
    sources: dict[str, str] = {}
    measured: dict[str, dict[str, Any]] = {}
    unshaped_reason = "--estimate" if estimate else shaping_unavailable_reason()
    for bandwidth in bandwidths:
        if unshaped_reason is None and names:
            timing_cfg = replace(cfg, steps=timing_steps, bandwidth=bandwidth, shape=True, steady_state=True)
            report = run_e2e(list(names), timing_cfg, out=stream, verbose=verbose,
                             title=f"pycomm bench tta (timing at {bandwidth})")
            if report["network"]["shaped"]:
                sources[bandwidth] = (f"measured: median of {timing_steps} steps on a shaped link "
                                      f"(tc tbf {bandwidth}, shared by all workers)")
                measured[bandwidth] = {r["method"]: r for r in report["results"]}
                continue
            reason = report["network"]["unshaped_reason"]
        else:
            reason = unshaped_reason or "no method to time"
        link = "W x bytes/worker/step x 8 / rate (one link shared by the W workers)" if shared_link else \
            "bytes/worker/step x 8 / rate (a link per worker)"
        sources[bandwidth] = f"estimate ({reason}): unshaped s/step + {link}"
    return sources, measured


def run_tta(methods: Sequence[str], config: Optional[BenchConfig] = None, *,
            bandwidths: Sequence[str] = DEFAULT_BANDWIDTHS, target_loss: Optional[float] = None,
            fraction: float = DEFAULT_FRACTION, window: Optional[int] = None, estimate: bool = False,
            shared_link: bool = True, timing_steps: int = DEFAULT_TIMING_STEPS, json_path: Optional[str] = None,
            markdown_path: Optional[str] = None, plot_path: Optional[str] = None, out: Optional[TextIO] = None,
            verbose: bool = True) -> dict[str, Any]:
    """Run the time-to-accuracy benchmark (see the module docstring).

    Args:
        methods: names in :data:`~pycomm.bench.methods.METHODS`; ``allreduce``
            is added first when ``target_loss`` is None (its curve sets the target).
        config: the run's settings; its ``bandwidth`` and ``shape`` are ignored (``bandwidths`` and ``estimate`` rule).
        bandwidths: link rates in tc syntax.
        target_loss: the target; None: :func:`default_target` of the ``allreduce`` row.
        fraction: see :func:`default_target`.
        window: smoothing window; None: :func:`default_window` of ``config.steps``.
        estimate: estimate every bandwidth's s/step instead of timing shaped steps.
        shared_link: in estimates, all workers share one link (as shaped); False: a link per worker.
        timing_steps: steps per method of each shaped timing run.
        json_path, markdown_path, plot_path: where to write the JSON, the table, the PNG plot.
        out: stream for progress and the table (default stdout).
        verbose: print progress and the table.

    Returns:
        ``{"config": {...}, "network": <the unshaped run's>, "results": [one :func:`method_record` per method]}``.

    Raises:
        ValueError: bad settings, or the baseline failed when the target is to come from it.
    """
    cfg = replace(config or BenchConfig(), bandwidth=None)
    for bandwidth in bandwidths:
        parse_rate(bandwidth)
    if not bandwidths:
        raise ValueError("no bandwidths given")
    if timing_steps < 1:
        raise ValueError(f"timing_steps must be >= 1, got {timing_steps}")
    names = list(dict.fromkeys(methods))
    if target_loss is None and BASELINE_METHOD not in names:
        names.insert(0, BASELINE_METHOD)
    if target_loss is not None and not math.isfinite(target_loss):
        raise ValueError(f"target_loss must be finite, got {target_loss}")
    win = window if window is not None else default_window(cfg.steps)
    if win < 1:
        raise ValueError(f"window must be >= 1, got {win}")
    stream = out if out is not None else sys.stdout

    curves = run_e2e(names, cfg, out=stream, verbose=verbose, title="pycomm bench tta (curves, unshaped)")
    rows = {r["method"]: r for r in curves["results"]}
    if target_loss is None:
        baseline = rows[BASELINE_METHOD]
        if baseline["status"] != "ok":
            raise ValueError(f"the {BASELINE_METHOD} baseline {baseline['status']} ({baseline['reason']}): "
                             "no default target; pass --target-loss")
        target = default_target(baseline["loss_curve"], fraction, win)
        target_source = (f"{BASELINE_METHOD}'s smoothed loss after {max(1, math.ceil(fraction * cfg.steps))} of "
                         f"{cfg.steps} steps ({fraction:g} of the run)")
    else:
        target, target_source = float(target_loss), "given (--target-loss)"

    ok = [name for name in names if rows[name]["status"] == "ok"]
    sources, measured = _timing_runs(ok, cfg, bandwidths, timing_steps, estimate, shared_link, stream, verbose)
    results = []
    for name in names:
        r = rows[name]
        step_time: dict[str, Optional[float]] = {}
        reason = r["reason"]
        for bandwidth in bandwidths:
            if r["status"] != "ok":
                step_time[bandwidth] = None
            elif bandwidth in measured:
                shaped = measured[bandwidth][name]
                step_time[bandwidth] = shaped["step_time_s"] if shaped["status"] == "ok" else None
                if shaped["status"] != "ok":
                    reason = f"at {bandwidth}: {shaped['status']}: {shaped['reason']}"
            else:
                step_time[bandwidth] = estimated_step_time(r["step_time_s"], r["bytes_per_worker_per_step"],
                                                           cfg.workers, bandwidth, shared_link)
        results.append(method_record(name, r["loss_curve"], target, win, step_time, r["final_loss"],
                                     r["bytes_per_worker_per_step"], status=r["status"], reason=reason,
                                     unshaped_step_time_s=r["step_time_s"], bytes_curve=r["bytes_curve"],
                                     workers=cfg.workers, shared_link=shared_link))
    report = {
        "config": {
            "target_loss": target, "target_source": target_source, "fraction": fraction, "window": win,
            "smoothing": f"trailing mean of the last {win} logged losses (fewer at the start)",
            "bandwidths": list(bandwidths), "step_time_source": sources, "estimate": estimate,
            "shared_link": shared_link, "timing_steps": timing_steps, "composition": COMPOSITION,
            "extra_link_time": EXTRA_LINK_TIME,
            "bench": cfg.to_dict(),
        },
        "network": curves["network"],
        "results": results,
    }
    publish(report, format_tta_table(report), json_path, markdown_path, verbose, stream)
    if plot_path and write_tta_plot(report, plot_path) and verbose:
        print(f"wrote {plot_path}", file=stream, flush=True)
    return report

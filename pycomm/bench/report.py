"""The benchmark's reports: progress lines, the comparison table and the loss plots."""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["format_table", "write_plots"]

logger = logging.getLogger(__name__)


def _format_bytes(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _format_mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


#: The row each run kind's speed column compares with.
_BASELINES = {"ddp": "allreduce", "fsdp": "fsdp", "hsdp": "hsdp"}


def _format_ratio(ratio: Optional[float]) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 1000 else f"{ratio:.2f}x"


def progress_line(index: int, total: int, r: Mapping[str, Any]) -> str:
    """One method's line in the progress output: its result in short, or why it failed."""
    if r["status"] != "ok":
        return f"[{index}/{total}] {r['method']:<15} {r['status'].upper()}: {r['reason']}"
    wire = r.get("wire_bytes_per_worker_per_step")
    wire_text = f", wire {wire:,.0f} B" if wire is not None else ""
    inter = r.get("inter_node_bytes_per_node_per_step")
    wire_text += f", inter-node {inter:,.0f} B/node" if inter is not None else ""
    sync = "" if r["replicas_in_sync"] else ", REPLICAS DIVERGED"
    return (f"[{index}/{total}] {r['method']:<15} loss {r['initial_loss']:.3f} -> {r['final_loss']:.3f} "
            f"(eval {r['eval_loss']:.3f}, acc {r['eval_accuracy']:.3f}), {r['step_time_s']:.3f} s/step, "
            f"{r['bytes_per_worker_per_step']:,.0f} B/worker/step{wire_text} "
            f"({_format_ratio(r['compression_ratio'])} vs fp32), {r['wall_s']:.1f} s{sync}")


_OPTIMIZER_NOTES = {
    "adamw": "adamw = AdamW(betas=(0.9, 0.95))",
    "sgd-momentum": "sgd-momentum = SGD(momentum=0.9)",
    "sgd": "sgd = SGD(momentum=0), the hook applies momentum (dgc: 0.9)",
    "spsa": "spsa = pycomm.zo.SPSA, zeroth order: no DDP, no backward pass, one byte per rank per step "
    "(counted as W-1 bytes sent: its byte to each peer)",
}


def format_table(results: Sequence[Mapping[str, Any]], network: Optional[Mapping[str, Any]] = None) -> str:
    """The results as a Markdown table, under a line that says how the network was set up.

    Columns: method | optimizer | final loss | eval loss | eval acc | s/step |
    speed vs allreduce (``fsdp`` or ``hsdp`` in sharded runs) | bytes/worker/step (counted) |
    wire bytes/worker/step (shaped runs) | compression vs fp32 | est. link s/step (when a bandwidth
    was requested) | peak mem/rank (MiB; a line under the table says of what, see
    :mod:`pycomm.bench.memory`). Failed and unavailable methods get a row with the reason.

    Args:
        results: rows as :func:`run_e2e` returns them.
        network: the ``network`` dict of :func:`run_e2e`'s JSON; None omits the header line.
    """
    lines: list[str] = []
    if network is not None:
        lines += [network_line(network), ""]
    # on emulated nodes, the bytes that crossed each node's uplink go next to the counted bytes per rank
    inter = bool(network and network.get("emulated_nodes")) or any(
        r.get("inter_node_bytes_per_node_per_step") is not None for r in results)
    parallel = (network or {}).get("parallel") or next((r.get("parallel") for r in results if r.get("parallel")),
                                                       "ddp")
    baseline_name = _BASELINES.get(parallel, "allreduce")
    lines += [
        f"| method | optimizer | final loss | eval loss | eval acc | s/step | speed vs {baseline_name} | "
        f"bytes/worker/step | {'inter-node bytes/node/step | ' if inter else ''}wire bytes/worker/step | "
        "compression vs fp32 | est. link s/step | peak mem/rank (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if inter else ""),
    ]
    baseline = next((r["step_time_s"] for r in results if r["method"] == baseline_name and r["status"] == "ok"),
                    None)
    used: list[str] = []
    for r in results:
        optimizer = r.get("optimizer", "adamw")
        lr = f" lr {r['lr']:g}" if r.get("lr") is not None else ""
        eps = f" eps {r['eps']:g}" if r.get("eps") is not None else ""
        if r["status"] != "ok":
            reason = " ".join(str(r["reason"]).split()).replace("|", "\\|")
            lines.append(f"| {r['method']} | {optimizer}{lr}{eps} | {r['status']}: {reason} "
                         "| | | | | | | | | |" + (" |" if inter else ""))
            continue
        if optimizer not in used:
            used.append(optimizer)
        speed = f"{baseline / r['step_time_s']:.2f}x" if baseline and r["step_time_s"] > 0 else "-"
        link = r.get("estimated_link_s_per_step")
        lines.append(
            f"| {r['method']} | {optimizer}{lr}{eps} | {r['final_loss']:.3f} | {r['eval_loss']:.3f} | "
            f"{r['eval_accuracy']:.3f} | {r['step_time_s']:.3f} | {speed} | "
            f"{_format_bytes(r['bytes_per_worker_per_step'])} | "
            + (f"{_format_bytes(r.get('inter_node_bytes_per_node_per_step'))} | " if inter else "")
            + f"{_format_bytes(r.get('wire_bytes_per_worker_per_step'))} | "
            f"{_format_ratio(r['compression_ratio'])} | {'-' if link is None else f'{link:.3f}'} | "
            f"{_format_mib(r.get('peak_memory_bytes'))} |"
        )
    if len(used) > 1:
        lines.append("\nOptimizers: " + "; ".join(_OPTIMIZER_NOTES.get(o, o) for o in used)
                     + ". Peak lr as shown, on the same warm-up/cosine schedule.")
    from pycomm.bench.memory import MEMORY_KINDS

    kinds = list(dict.fromkeys(r.get("peak_memory_kind") for r in results if r.get("peak_memory_kind")))
    if kinds:
        lines.append("\nPeak mem/rank: " + "; ".join(f"{kind}: {MEMORY_KINDS.get(kind, kind)}" for kind in kinds)
                     + ", max over ranks.")
    notes = _method_notes(r["method"] for r in results)
    if notes:
        lines.append("\n" + "\n".join(f"Note: {note}." for note in notes))
    return "\n".join(lines)


def _method_notes(names: Iterable[str]) -> list[str]:
    """The :attr:`MethodSpec.note` of each named method of the table, once each, in order."""
    from pycomm.bench.methods import METHODS

    notes = (METHODS[name].note for name in names if name in METHODS)
    return list(dict.fromkeys(note for note in notes if note))


def network_line(network: Mapping[str, Any]) -> str:
    """The run's header line: model, workers, steps, and the link (shaped, or why not)."""
    run = (f"model {network['model']} ({network['parameters']:,} parameters), {network['workers']} workers "
           f"({network['backend']}), {network['steps']} steps, batch {network['batch_size']}/worker")
    if network.get("hierarchy"):
        run += f", hierarchy={network['hierarchy']} for every pycomm method"
    if network.get("parallel") == "fsdp":
        run += f", FSDP2 (fully_shard per block or layer, and the root) over all {network['workers']} workers"
    elif network.get("parallel") == "hsdp":
        replicas = network["replicas"]
        run += (f", HSDP: {replicas} replicas x {network['workers'] // replicas} shards (FSDP2 inside a replica of "
                "consecutive ranks, all-reduce across replicas)")
    if network.get("emulated_nodes"):
        topology = network["topology"]
        if network["shaped"]:
            delay = f", delay {network['delay']}" if network.get("delay_applied") else ""
            note = f" ({network['delay_note']})" if network.get("delay_note") else ""
            link = f"each node's uplink limited to {network['bandwidth']} in both directions by tc tbf{delay}{note}"
        else:
            link = f"uplinks unshaped ({network['unshaped_reason']})"
        return (f"**{network['nodes']} emulated nodes x {network['nproc_per_node']} processes**: {run}; one "
                f"torchrun (c10d rendezvous) per node namespace `{topology['namespaces'][0]}`..., nodes "
                f"{', '.join(topology['addresses'])} on a bridge, {link}; ranks of one node talk over its lo, "
                "unshaped. Inter-node bytes: the node's eth0 tx_bytes per step (payload + TCP/IP headers), mean over "
                "nodes, median over steps. Wire bytes: lo + eth0 tx_bytes of all nodes per step / workers.")
    if network.get("nodes_note"):
        run += f" (**{network['nodes_note']}**)"
    if network["shaped"]:
        delay = f", delay {network['delay']}" if network.get("delay_applied") else ""
        note = f" ({network['delay_note']})" if network.get("delay_note") else ""
        return (f"**Shaped**: {run}; all workers in network namespace `{network['namespace']}`, loopback limited "
                f"to {network['bandwidth']} by tc tbf{delay}, one link shared by all workers{note}. "
                "Wire bytes: lo tx_bytes per step / workers, median over steps.")
    if network.get("bandwidth"):
        return (f"**Unshaped** ({network['unshaped_reason']}): {run}; est. link s/step = the time the counted "
                f"bytes of all workers take on one shared {network['bandwidth']} link.")
    return f"**Unshaped** (no --bandwidth): {run}."


def publish(report: Mapping[str, Any], table: str, json_path: Optional[str], markdown_path: Optional[str],
            verbose: bool, stream: Any) -> None:
    """Print ``table`` (when ``verbose``) and write the report as JSON and the table as Markdown where asked."""
    if verbose:
        print("", file=stream)
        print(table, file=stream, flush=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        logger.info("wrote %s", json_path)
    if markdown_path:
        with open(markdown_path, "w", encoding="utf-8") as fh:
            fh.write(table + "\n")


def write_plots(results: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    """Plot loss against wall-clock time and against bytes sent; return the PNG paths (none without matplotlib).

    Writes ``<prefix>_loss_vs_time.png`` and ``<prefix>_loss_vs_bytes.png``
    (cumulative step time of the slowest rank; cumulative counted bytes per
    worker). Needs the optional ``matplotlib`` (``pip install pycomm[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plots")
        return []
    rows = [r for r in results if r["status"] == "ok" and r["loss_curve"]]
    paths = []
    for key, label, suffix in (("step_time_curve_s", "wall-clock time of the training steps (s)", "time"),
                               ("bytes_curve", "bytes sent per worker (counted)", "bytes")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            xs, total = [], 0.0
            for value in r[key]:
                total += value
                xs.append(total)
            ax.plot(xs, r["loss_curve"], label=r["method"])
        ax.set_xlabel(label)
        ax.set_ylabel("training loss (nats/byte)")
        if suffix == "bytes":
            ax.set_xscale("symlog", linthresh=1.0)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        path = f"{prefix}_loss_vs_{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths

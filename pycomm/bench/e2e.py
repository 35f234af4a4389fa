"""End-to-end benchmark: train a model with DDP under each gradient-communication method, over a shaped link.

``pycomm bench e2e`` (also ``python -m pycomm.bench e2e``, and ``pycomm demo``
with the demo's defaults) answers one question per row: on this link, with this
model, how fast does a step run, how many bytes does each worker send, and how
far does the loss get?

How a run works
---------------
* The harness starts one launcher (``python -m pycomm.bench.launcher --launch SPEC``,
  in a new session) that forks ``workers`` processes (Gloo on CPU; NCCL with
  one GPU per rank where CUDA is available and ``backend`` asks for it); they
  run the methods one after the other, each in a process group of its own
  making (DDP, hook, optimizer). A method whose workers crash is reported as
  failed with the exception; one whose workers stop making progress
  (``stall_timeout_s`` without a step, e.g. a hook that deadlocks) is killed,
  with the launcher's whole process group, and reported as failed; a fresh
  launcher then runs the remaining methods. A method that needs a pycomm method not registered in this build (see
  :func:`pycomm.available_methods`) is reported as unavailable.
* With ``bandwidth`` set and shaping allowed (root on Linux), all workers run
  inside one network namespace whose loopback is shaped by tc
  (:class:`pycomm.bench.netns.ShapedNamespace`): the rate is shared by all workers.
  The namespace is removed at the end, on errors and on Ctrl-C/SIGTERM too.
  Where shaping is not allowed the run is unshaped, the table says so, and the
  column ``est. link s/step`` gives the time the counted bytes would take on
  such a shared link (``W * bytes/worker/step * 8 / rate``). On emulated nodes it is
  the time of the bytes that crossed one node's uplink (``inter-node bytes/node/step * 8 / rate``).
* With ``nodes`` set (``--nodes N --nproc-per-node M``) and namespaces allowed, the
  harness emulates N nodes (:class:`pycomm.bench.node_network.EmulatedNodes`: a
  namespace per node with one veth uplink onto a bridge, addresses 198.18.0.i,
  each uplink shaped to ``bandwidth`` in both directions) and starts one
  ``torchrun --nnodes N --nproc-per-node M --rdzv-backend c10d`` per node
  (:func:`pycomm.bench.launcher.torchrun_command`), with ``GLOO_SOCKET_IFNAME=eth0``.
  Ranks of one node talk over its loopback, unshaped. Where namespaces are not
  allowed the run says that it cannot emulate nodes and runs the N*M workers on
  one machine, as without ``nodes``.
* Every method trains the same model from the same initial weights on the same
  batches for ``steps`` steps with its own optimizer (:attr:`MethodSpec.optimizer`),
  at the model's learning rate for that optimizer (:attr:`ModelSpec.learning_rates`).

With ``config.parallel`` ``"fsdp"`` or ``"hsdp"`` (``--parallel``) the model is sharded with FSDP2
(:mod:`pycomm.bench.parallel`) instead of wrapped in DDP, the methods are the sharded ones
(``fsdp``, ``fsdp-quant8``, ...), and the counted bytes include the forward's parameter all-gathers.

What is measured, per method
----------------------------
* ``step_time_s``: median over steps of the slowest rank's step time (forward,
  backward with the hook's communication, optimizer step).
* ``bytes_per_worker_per_step``: counted at the process-group level by
  :class:`pycomm.traffic.CollectiveByteCounter` from the tensors each collective
  really sends (ring all-reduce ``2(W-1)/W`` of the input, all-gather ``W-1``
  times, ...): median over steps of the mean over ranks, i.e. the steady state
  (compressing methods all-reduce uncompressed for their first steps).
* ``wire_bytes_per_worker_per_step`` (shaped runs only): the bytes that really
  crossed the namespace's loopback (``/sys/class/net/lo/statistics/tx_bytes``,
  read by rank 0 before the loop and after every step, divided by workers):
  median over steps, like the counted bytes, so the two differ by the TCP/IP
  and Gloo overhead; ``mean_wire_bytes_per_worker_per_step`` is the whole
  loop's total over workers and steps (compare it with
  ``mean_bytes_per_worker_per_step``).
* ``inter_node_bytes_per_node_per_step`` (emulated nodes only): the bytes that
  crossed the inter-node link per node per step: the node's uplink tx bytes
  (``/sys/class/net/eth0/statistics/tx_bytes`` read inside the node's namespace
  by its local rank 0 before the loop and after every step; payload plus the
  TCP/IP and Ethernet headers of the packets handed to the veth), mean over
  nodes, median over steps; ``mean_inter_node_bytes_per_node_per_step`` is the
  loop's total over nodes and steps. On emulated nodes the wire bytes per worker
  are each node's ``lo`` plus ``eth0`` tx bytes, summed over nodes, over workers.
* ``compression_ratio``: an fp32 ring all-reduce's bytes over the counted bytes.
* ``peak_memory_bytes``: the peak memory of a rank during the method's training loop (max over ranks): on
  CPU the process's peak RSS (``VmHWM``, reset before the method; it includes torch itself), on CUDA the
  peak of allocated tensor memory (:mod:`pycomm.bench.memory`).
* ``final_loss``: mean training loss of the last ``final_window`` steps (mean
  over ranks); ``eval_loss`` and ``eval_accuracy`` (next-byte top-1) on a fixed
  held-out set.

Example::

    results = run_e2e(["allreduce", "quant4"], BenchConfig(workers=2, steps=20, bandwidth="1gbit"))
"""

from __future__ import annotations

import logging
import sys
import tempfile
from typing import Any, Iterable, Mapping, Optional, TextIO, Union

from pycomm.bench.config import BenchConfig
from pycomm.bench.launcher import empty_result, run_pool, signals_raise_keyboard_interrupt, unavailable_reason
from pycomm.bench.methods import DEFAULT_METHODS, METHODS, MethodSpec, check_parallel
from pycomm.bench.netns import ShapedNamespace, parse_rate, shaping_unavailable_reason
from pycomm.bench.node_network import EmulatedNodes
from pycomm.bench.report import format_table, network_line, progress_line, publish, write_plots

__all__ = ["run_e2e"]


def _resolve(methods: Union[str, Iterable[str], Mapping[str, MethodSpec]]) -> list[tuple[str, MethodSpec]]:
    if isinstance(methods, Mapping):
        resolved = list(methods.items())
    else:
        names = [methods] if isinstance(methods, str) else list(methods)
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        resolved = [(n, METHODS[n]) for n in names]
    if not resolved:
        raise ValueError("no methods given")
    return resolved


def run_e2e(methods: Union[str, Iterable[str], Mapping[str, MethodSpec]] = DEFAULT_METHODS,
            config: Optional[BenchConfig] = None, *, json_path: Optional[str] = None,
            markdown_path: Optional[str] = None, plot_prefix: Optional[str] = None,
            out: Optional[TextIO] = None, verbose: bool = True, title: str = "pycomm bench e2e") -> dict[str, Any]:
    """Train under each method, over a shaped link where possible, and compare them.

    Args:
        methods: names in :data:`~pycomm.bench.methods.METHODS`, or a mapping from name to :class:`MethodSpec`.
        config: the run's settings (default :class:`BenchConfig`).
        json_path: write the report as JSON there.
        markdown_path: write the table (with its header line) there.
        plot_prefix: write PNG plots there (see :func:`write_plots`; needs matplotlib).
        out: stream for the progress lines and the table (default stdout).
        verbose: print progress lines and the table.
        title: first word of the progress output.

    Returns:
        ``{"config": ..., "network": ..., "results": [...]}``: ``network`` says
        whether the run was shaped (namespace, qdisc, bandwidth, delay) or why
        not; ``results`` has one dict per method, in order, with ``method``,
        ``status`` (``ok``, ``failed`` or ``unavailable``), ``reason``,
        ``step_time_s``, ``bytes_per_worker_per_step``,
        ``wire_bytes_per_worker_per_step`` (None when unshaped),
        ``compression_ratio``, ``final_loss``, ``eval_loss``, ``eval_accuracy``,
        ``shaped``, ``estimated_link_s_per_step`` (None without a bandwidth),
        ``inter_node_bytes_per_node_per_step`` (None unless nodes were emulated),
        ``parallel``, ``bytes_by_collective_per_worker_per_step`` (median over steps per collective name),
        ``bytes_by_mesh_dim_per_worker_per_step`` (sharded runs: per mesh dimension, ``shard`` or
        ``replicate``), ``peak_memory_bytes`` (max over ranks; ``peak_memory_kind`` says of what, see
        :mod:`pycomm.bench.memory`), ``peak_memory_per_rank``, ``start_memory_bytes``
        and the per-step curves (see the module docstring). With ``config.nodes``,
        ``network`` also has ``nodes``, ``nproc_per_node``, ``emulated_nodes``
        (whether the nodes were emulated), ``nodes_note`` (why not) and ``topology``.

    Raises:
        ValueError: on an unknown method, a method of another ``config.parallel`` kind, or bad settings.
        KeyboardInterrupt: on Ctrl-C, SIGTERM or SIGHUP, after the running
            method's processes and the namespace are gone.
    """
    cfg = config or BenchConfig()
    resolved = _resolve(methods)
    check_parallel(resolved, cfg.parallel)
    stream = out if out is not None else sys.stdout
    root = logging.getLogger()
    log_level = root.getEffectiveLevel() if root.handlers else None
    parameters = sum(p.numel() for p in cfg.model_spec.build().parameters())
    network: dict[str, Any] = {
        "model": cfg.model, "parameters": parameters, "workers": cfg.workers, "backend": cfg.resolved_backend,
        "steps": cfg.steps, "batch_size": cfg.batch, "bandwidth": cfg.bandwidth, "delay": cfg.delay,
        "shaped": False, "unshaped_reason": None, "namespace": None, "qdisc": None, "delay_applied": False,
        "delay_note": None, "parallel": cfg.parallel,
        "replicas": cfg.hsdp_replicas if cfg.parallel == "hsdp" else None,
    }
    if cfg.nodes is not None:
        network.update(nodes=cfg.nodes, nproc_per_node=cfg.nproc_per_node, hierarchy=cfg.hierarchy,
                       emulated_nodes=False, nodes_note=None, topology=None)
    results: list[dict[str, Any]] = []
    net: Optional[ShapedNamespace] = None
    nodes: Optional[EmulatedNodes] = None
    with signals_raise_keyboard_interrupt(), tempfile.TemporaryDirectory(prefix="pycomm-e2e-") as run_root:
        try:
            if cfg.nodes is not None:
                nodes = _emulate_nodes(cfg, network)
            if nodes is not None:
                pass  # the node uplinks are the shaped links
            elif cfg.bandwidth is None:
                network["unshaped_reason"] = "no bandwidth requested"
            elif not cfg.shape:
                network["unshaped_reason"] = "shaping turned off (--no-shape)"
            elif (reason := shaping_unavailable_reason()) is not None:
                network["unshaped_reason"] = reason
            else:
                try:
                    net = ShapedNamespace(cfg.bandwidth, cfg.delay).create()
                except RuntimeError as e:
                    network["unshaped_reason"] = f"shaping failed: {e}"
                    net = None
                if net is not None:
                    network.update(shaped=True, namespace=net.name, qdisc=net.qdisc,
                                   delay_applied=net.delay_applied, delay_note=net.delay_note)
            if verbose:
                print(f"{title}: {len(resolved)} method(s); {network_line(network)}", file=stream, flush=True)
            rate = parse_rate(cfg.bandwidth) if cfg.bandwidth else None
            total = len(resolved)
            slots: list[Optional[dict[str, Any]]] = [None] * total

            def on_start(index: int) -> None:
                if verbose:
                    print(f"[{index + 1}/{total}] {resolved[index][0]}: running ...", file=stream, flush=True)

            def on_result(index: int, result: dict[str, Any]) -> None:
                result["estimated_link_s_per_step"] = estimated_link_seconds(result, cfg.workers, rate,
                                                                             nodes is not None)
                slots[index] = result
                if verbose:
                    print(progress_line(index + 1, total, result), file=stream, flush=True)

            runnable = []
            for index, (name, spec) in enumerate(resolved):
                reason = unavailable_reason(spec)
                if reason is None:
                    runnable.append((index, name, spec))
                else:
                    result = empty_result(name, spec, cfg, "unavailable", reason)
                    result["shaped"] = net is not None or bool(network["shaped"])
                    on_result(index, result)
            run_pool(runnable, cfg, net, run_root, log_level, on_start, on_result, nodes=nodes)
            results = [r for r in slots if r is not None]
        finally:
            if net is not None:
                net.remove()
            if nodes is not None:
                nodes.remove()
    report = {"config": cfg.to_dict(), "network": network, "results": results}
    publish(report, format_table(results, network), json_path, markdown_path, verbose, stream)
    if plot_prefix:
        for path in write_plots(results, plot_prefix):
            if verbose:
                print(f"wrote {path}", file=stream, flush=True)
    return report


def estimated_link_seconds(result: dict[str, Any], workers: int, rate_bps: Optional[float],
                           emulated_nodes: bool) -> Optional[float]:
    """The link time of one step at ``rate_bps``: on emulated nodes, the bytes that crossed a node's own
    uplink (``inter_node_bytes_per_node_per_step``; traffic inside a node never reaches it); otherwise
    the counted bytes of all ``workers`` on one shared link. None without a rate or without the bytes."""
    if rate_bps is None:
        return None
    if emulated_nodes:
        inter = result.get("inter_node_bytes_per_node_per_step")
        return None if inter is None else inter * 8 / rate_bps
    counted = result.get("bytes_per_worker_per_step")
    return None if counted is None else workers * counted * 8 / rate_bps


def _emulate_nodes(cfg: BenchConfig, network: dict[str, Any]) -> Optional[EmulatedNodes]:
    """Build ``cfg.nodes`` emulated nodes with uplinks shaped to ``cfg.bandwidth`` (unshaped without one, or with
    ``shape`` off) and record them in ``network``; None, with the reason in ``network["nodes_note"]``, where
    namespaces cannot be made (the run then goes on with all workers on one machine)."""
    reason = shaping_unavailable_reason()
    if reason is None:
        rate = cfg.bandwidth if cfg.shape else None
        unshaped_reason = None
        if rate is None:
            unshaped_reason = "no bandwidth requested" if cfg.bandwidth is None else "shaping turned off (--no-shape)"
        try:
            nodes = EmulatedNodes(cfg.nodes or 1, rate, cfg.delay).create()
        except RuntimeError as e:
            reason = f"creating them failed: {e}"
        else:
            network.update(emulated_nodes=True, topology=nodes.describe(), shaped=rate is not None,
                           qdisc=next(iter(nodes.qdiscs.values()), None),  # all uplinks alike
                           delay_applied=nodes.delay_applied, delay_note=nodes.delay_note,
                           unshaped_reason=unshaped_reason)
            return nodes
    network["nodes_note"] = (f"cannot emulate {cfg.nodes} nodes ({reason}): ran all {cfg.workers} workers on one "
                             "machine instead")
    return None

"""Tests of the emulated multi-node benchmark: node namespaces on a bridge, one torchrun (c10d) per node, the
inter-node byte figure, clean-up on every exit, and the single-machine fallback without root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from process_table import running_since, wait_gone
from pycomm.bench import netns
from pycomm.bench.cli import build_parser, main as cli_main
from pycomm.bench.config import BenchConfig
from pycomm.bench.e2e import run_e2e
from pycomm.bench.launcher import _nodes_failure_reason
from pycomm.bench.methods import METHODS
from pycomm.bench.node_network import NODE_INTERFACE, EmulatedNodes
from pycomm.bench.report import format_table
from pycomm.bench.worker import _wire_bytes

ROOT_REASON = netns.shaping_unavailable_reason()
needs_root = pytest.mark.skipif(ROOT_REASON is not None, reason=f"cannot make network namespaces: {ROOT_REASON}")

#: The small run of these tests: the demo's lm model with few, short sequences, a small corpus and eval set.
TINY = dict(batch_size=2, corpus_bytes=200_000, eval_batches=2, eval_batch_size=4, start_timeout_s=120)

#: Header overhead allowed on the uplink counter: at worst (no GSO) a 1448-byte TCP segment travels as a
#: 1514-byte frame (Ethernet 14 + IP 20 + TCP with timestamps 32: +4.6%), and the node also transmits the ACKs of
#: what it receives (a 66-byte ACK per two segments: +2.3% of the received bytes, which equal the sent bytes in
#: these symmetric collectives). So 7%, plus 64 KiB per step for the odd store or barrier message.
HEADER_FACTOR = 1.07
SLACK_BYTES = 64 * 1024


def _my_namespaces(pid: int) -> list[str]:
    return [n for n in netns._list_namespaces() if n.startswith(f"{netns.NAME_PREFIX}{pid}-")]


# --------------------------------------------------------------------------- no namespaces needed


def test_cli_nodes_workers_and_hierarchy(capsys):
    parser = build_parser()
    args = parser.parse_args(["bench", "e2e", "--nodes", "2", "--nproc-per-node", "2", "--hierarchy", "node",
                              "--steps", "3"])
    from pycomm.bench.cli import _config

    cfg = _config(args, "lm")
    assert (cfg.workers, cfg.nodes, cfg.nproc_per_node, cfg.hierarchy) == (4, 2, 2, "node")
    cfg = _config(parser.parse_args(["bench", "e2e", "--nodes", "2", "--workers", "6", "--steps", "3"]), "lm")
    assert (cfg.workers, cfg.nproc_per_node) == (6, 3)
    cfg = _config(parser.parse_args(["bench", "e2e", "--steps", "3"]), "lm")
    assert (cfg.workers, cfg.nodes, cfg.hierarchy) == (4, None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "e2e", "--hierarchy", "rack"])
    # both given and they disagree: refused before anything starts, with the numbers
    assert cli_main(["bench", "e2e", "--nodes", "2", "--nproc-per-node", "2", "--workers", "3"]) == 2
    assert "--workers 3 disagrees with --nodes 2 x --nproc-per-node 2 = 4" in capsys.readouterr().err
    assert cli_main(["bench", "e2e", "--tta", "--nodes", "2"]) == 2
    assert "are for e2e runs, not --tta" in capsys.readouterr().err
    with pytest.raises(ValueError, match="divide workers"):
        BenchConfig(workers=3, nodes=2)
    # emulated nodes measure Gloo over the veths: NCCL would join one machine's GPUs directly
    assert BenchConfig(workers=2, nodes=2).resolved_backend == "gloo"
    with pytest.raises(ValueError, match="bypassing the shaped node uplinks"):
        BenchConfig(workers=2, nodes=2, backend="nccl").resolved_backend


def test_hierarchy_goes_to_every_pycomm_method_only(monkeypatch):
    """--hierarchy reaches pycomm.register's kwargs of each pycomm method (and nothing when not given);
    PyTorch's own hooks never see it."""
    import pycomm

    calls = []
    monkeypatch.setattr(pycomm, "register", lambda ddp, name, **kw: calls.append((name, kw)))
    for hierarchy in ("node", "auto", "flat", None):
        calls.clear()
        cfg = BenchConfig(steps=50, hierarchy=hierarchy)
        for method in ("quant4", "dgc", "lgreco-quant", "spsa-projection"):
            METHODS[method].attach(None, cfg)
        assert [name for name, _ in calls] == ["quant", "dgc", "lgreco", "spsa-projection"]
        assert all(kw.get("hierarchy") == hierarchy for _, kw in calls)
        assert all(("hierarchy" in kw) == (hierarchy is not None) for _, kw in calls)
        assert calls[0][1]["bits"] == 4  # the method's own options are kept

    class FakeDDP:
        def register_comm_hook(self, state, hook):
            calls.append(("torch", {}))

    calls.clear()
    METHODS["allreduce"].attach(FakeDDP(), BenchConfig(hierarchy="node"))
    assert calls == [("torch", {})]


def test_wire_and_inter_node_bytes_from_the_readings():
    """Two nodes' local rank 0 read (lo, eth0) before the loop and after each of 3 steps; two ranks read nothing."""
    node0 = {"interfaces": ["lo", NODE_INTERFACE], "marks": [[0, 0], [10, 100], [20, 300], [30, 400]], "end": [35, 410]}
    node1 = {"interfaces": ["lo", NODE_INTERFACE], "marks": [[5, 7], [15, 107], [25, 207], [35, 307]], "end": [40, 310]}
    silent = {"interfaces": [], "marks": [], "end": None}
    wire, wire_mean, inter, inter_mean = _wire_bytes([node0, silent, node1, silent], world=4, steps=3)
    # per step, eth0 of node 0 and 1: (100, 100), (200, 100), (100, 100) -> mean over nodes 100, 150, 100
    assert inter == 100 and inter_mean == pytest.approx((410 + 303) / (2 * 3))
    # per step, lo + eth0 of both nodes over 4 workers: (110 + 110) / 4, (210 + 110) / 4, (110 + 110) / 4
    assert wire == 55 and wire_mean == pytest.approx((445 + 338) / (4 * 3))
    # one machine: rank 0 reads lo only, no inter-node figure
    lo = {"interfaces": ["lo"], "marks": [[0], [8], [16]], "end": [20]}
    assert _wire_bytes([lo, silent], world=2, steps=2) == (4, 5, None, None)
    assert _wire_bytes([silent, silent], world=2, steps=2) == (None, None, None, None)


def test_nodes_failure_reason_prefers_the_cause_over_its_consequences():
    cause = "Traceback ...\nTypeError: __init__() got an unexpected keyword argument 'hierarchy'\n"
    consequence = "RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer [198.18.0.1]:1234\n"
    wrapped = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    assert "unexpected keyword argument 'hierarchy'" in _nodes_failure_reason([consequence + wrapped,
                                                                              cause + wrapped], [1, 1])
    # torchrun's workers print their traceback with a "[rankN]: " prefix
    prefixed = "".join(f"[rank1]: {line}\n" for line in cause.splitlines())
    reason = _nodes_failure_reason([prefixed + "E1201 ... failed (exitcode: 1) local_rank: 0\n" + wrapped], [1])
    assert "TypeError: __init__() got an unexpected keyword argument 'hierarchy'" in reason


def test_table_has_the_inter_node_column_only_with_nodes():
    row = {"method": "allreduce", "status": "ok", "optimizer": "adamw", "lr": 3e-3, "eps": None, "final_loss": 4.0,
           "eval_loss": 4.1, "eval_accuracy": 0.3, "step_time_s": 0.1, "bytes_per_worker_per_step": 2_000_000,
           "wire_bytes_per_worker_per_step": 2_010_000, "compression_ratio": 1.0, "estimated_link_s_per_step": None,
           "inter_node_bytes_per_node_per_step": 2_020_000}
    table = format_table([row])
    assert "| bytes/worker/step | inter-node bytes/node/step | wire bytes/worker/step |" in table
    assert "| 2,000,000 | 2,020,000 | 2,010,000 |" in table
    assert "inter-node" not in format_table([{**row, "inter_node_bytes_per_node_per_step": None}])


def test_link_estimate_on_nodes_counts_only_what_crossed_the_uplink():
    """On emulated nodes each node has an uplink of the rate, and traffic inside a node never reaches it:
    the estimate is the inter-node bytes of one node, not the counted bytes of every worker."""
    from pycomm.bench.e2e import estimated_link_seconds

    row = {"bytes_per_worker_per_step": 1_000_000, "inter_node_bytes_per_node_per_step": 250_000}
    assert estimated_link_seconds(row, 4, 1e9, emulated_nodes=True) == pytest.approx(0.002)
    assert estimated_link_seconds(row, 4, 1e9, emulated_nodes=False) == pytest.approx(0.032)  # one shared link
    assert estimated_link_seconds(row, 4, None, emulated_nodes=True) is None
    assert estimated_link_seconds({**row, "inter_node_bytes_per_node_per_step": None}, 4, 1e9, True) is None


def test_without_root_it_says_so_and_runs_on_one_machine(tmp_path, capsys, monkeypatch):
    import pycomm.bench.e2e as e2e

    monkeypatch.setattr(e2e, "shaping_unavailable_reason", lambda: "network namespaces need root")
    out = tmp_path / "nodes.json"
    rc = cli_main(["bench", "e2e", "--nodes", "2", "--nproc-per-node", "1", "--steps", "2", "--methods",
                   "allreduce", "--bandwidth", "1gbit", "--batch-size", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cannot emulate 2 nodes (network namespaces need root): ran all 2 workers on one machine" in printed
    report = json.loads(out.read_text())
    net = report["network"]
    assert net["emulated_nodes"] is False and net["nodes"] == 2 and net["workers"] == 2 and not net["shaped"]
    assert "cannot emulate 2 nodes" in net["nodes_note"] and net["unshaped_reason"] == "network namespaces need root"
    (r,) = report["results"]
    assert r["status"] == "ok" and r["workers"] == 2 and r["replicas_in_sync"]
    assert r["inter_node_bytes_per_node_per_step"] is None and r["rank_nodes"] is None
    assert _my_namespaces(os.getpid()) == []


# --------------------------------------------------------------------------- namespaces (root on Linux)


@needs_root
def test_emulated_nodes_topology_and_removal_on_error():
    nodes = EmulatedNodes(2, "100mbit", delay="1ms")
    with pytest.raises(RuntimeError, match="deliberate"):
        with nodes:
            assert set(_my_namespaces(os.getpid())) == {*nodes.names, nodes.switch}
            node0 = nodes.exec_prefix(0)
            addresses = subprocess.run(node0 + ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                                       check=True).stdout
            assert "198.18.0.1/24" in addresses and f" {NODE_INTERFACE} " in addresses
            routes = subprocess.run(node0 + ["ip", "route"], capture_output=True, text=True, check=True).stdout
            assert "default" not in routes  # nothing routed outside
            # to the other node over the veth, to itself over lo (intra-node traffic is not shaped)
            assert f"dev {NODE_INTERFACE}" in subprocess.run(node0 + ["ip", "route", "get", "198.18.0.2"],
                                                             capture_output=True, text=True).stdout
            assert "dev lo" in subprocess.run(node0 + ["ip", "route", "get", "198.18.0.1"],
                                              capture_output=True, text=True).stdout
            # both directions of both uplinks are shaped
            assert sorted(nodes.qdiscs) == sorted([f"{nodes.names[0]}/eth0", f"{nodes.names[1]}/eth0",
                                                   f"{nodes.switch}/n0", f"{nodes.switch}/n1"])
            assert all("tbf" in q and "100Mbit" in q for q in nodes.qdiscs.values())
            assert nodes.delay_applied or "netem" in (nodes.delay_note or "")
            sleeper = subprocess.Popen(nodes.exec_prefix(1) + ["sleep", "600"])
            time.sleep(0.5)
            started = {sleeper.pid: running_since(sleeper.pid)}
            raise RuntimeError("deliberate")
    sleeper.wait(timeout=10)
    assert not wait_gone(started) and not nodes.exists() and _my_namespaces(os.getpid()) == []
    nodes.remove()  # idempotent


@needs_root
def test_two_nodes_through_torchrun(tmp_path, monkeypatch):
    """2 nodes x 2 processes, each node's processes started by its own torchrun (c10d rendezvous), Gloo over the
    veth: fp32 all-reduce and quant4 (flat) train, all 4 ranks end bit-identical, and the node's uplink carries
    at most what the collectives' design predicts.

    The formulas (W = 4 ranks, M = 2 per node, N = gradient bytes; node i holds ranks 2i and 2i+1: torchrun
    numbers a node's ranks contiguously):

    * fp32 all-reduce: Gloo's ring all-reduce sends 2(W-1) chunks of N/W from each rank to the next; the ring
      0-1-2-3-0 crosses the link once per node (1->2, 3->0), so each node's uplink carries 2(W-1)/W * N, the
      ``fp32_allreduce_bytes_per_step``, at least (it is payload) and at most that times the header factor.
    * quant4 (any method): every byte on a node's uplink was sent by one of that node's ranks to a rank of the
      other node, so it carries at most the bytes the node's ranks send, M * bytes_per_worker_per_step (the
      counted process-group bytes), times the header factor.
    """
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the workers' command lines name tmp_path
    # quant4 all-reduces uncompressed for its first 2 steps (start_iter): 5 steps make the median compressed
    # flat, explicitly (the library's default too); node mode is the test below
    cfg = BenchConfig(workers=4, nodes=2, steps=5, bandwidth="1gbit", hierarchy="flat", **TINY)
    report = run_e2e(["allreduce", "quant4"], cfg, verbose=False)
    net = report["network"]
    assert net["emulated_nodes"] and net["shaped"] and net["topology"]["addresses"] == ["198.18.0.1", "198.18.0.2"]
    assert "tbf" in net["qdisc"] and "1Gbit" in net["qdisc"]
    results = {r["method"]: r for r in report["results"]}
    for name, r in results.items():
        assert r["status"] == "ok", r["reason"]
        assert r["workers"] == 4 and r["shaped"] is True and r["final_loss"] < r["initial_loss"]
        checksums = r["param_checksums"]
        assert len(checksums) == 4 and len(set(checksums)) == 1, f"{name}: ranks differ: {checksums}"
        # ranks keyed by torchrun's RANK: two per node namespace, contiguous
        nodes = r["rank_nodes"]
        assert sorted(nodes) == [0, 0, 1, 1] and nodes[0] == nodes[1] != nodes[2] == nodes[3]
    allreduce, quant4 = results["allreduce"], results["quant4"]
    ring = allreduce["fp32_allreduce_bytes_per_step"]
    assert allreduce["bytes_per_worker_per_step"] == ring
    assert ring <= allreduce["inter_node_bytes_per_node_per_step"] <= ring * HEADER_FACTOR + SLACK_BYTES
    counted = quant4["bytes_per_worker_per_step"]
    assert counted < ring / 4  # compressed by then
    assert 0 < quant4["inter_node_bytes_per_node_per_step"] <= 2 * counted * HEADER_FACTOR + SLACK_BYTES
    # clean-up after a normal run: no namespace, no process of the run
    assert _my_namespaces(os.getpid()) == []
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == []


@needs_root
def test_nodes_removed_when_the_run_raises(monkeypatch):
    """An exception in the middle of a run (here: from the pool, with a process running in a node) removes the
    namespaces and kills what runs in them."""
    import pycomm.bench.e2e as e2e

    seen = {}

    def failing_pool(pending, cfg, net, run_root, log_level, on_start, on_result, nodes=None):
        proc = subprocess.Popen(nodes.exec_prefix(1) + ["sleep", "600"], start_new_session=True)
        time.sleep(0.5)
        seen.update(names=nodes.all_names(), processes={proc.pid: running_since(proc.pid)}, proc=proc)
        raise RuntimeError("deliberate failure mid-run")

    monkeypatch.setattr(e2e, "run_pool", failing_pool)
    with pytest.raises(RuntimeError, match="deliberate failure mid-run"):
        run_e2e(["allreduce"], BenchConfig(workers=2, nodes=2, steps=1, bandwidth="1gbit", **TINY), verbose=False)
    seen["proc"].wait(timeout=10)
    assert not wait_gone(seen["processes"])
    assert not set(seen["names"]) & set(netns._list_namespaces())


@needs_root
def test_nodes_removed_on_sigterm_with_torchrun_inside(tmp_path):
    script = ("import sys; from pycomm.bench.cli import main; "
              "sys.exit(main(['bench', 'e2e', '--nodes', '2', '--nproc-per-node', '2', '--steps', '100000', "
              "'--methods', 'allreduce', '--bandwidth', '1gbit', '--batch-size', '2']))")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, start_new_session=True, env=env)
    names, inside, deadline = [], {}, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and len(inside) < 6:  # two torchruns and four workers
            time.sleep(0.5)
            names = _my_namespaces(proc.pid)
            inside = {pid: running_since(pid) for name in names for pid in netns._namespace_pids(name)}
        if len(inside) < 6:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the workers never started in the nodes: {names}, {inside}:\n{proc.communicate()[0]}")
        assert len(names) == 3
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "KeyboardInterrupt" in output and "SIGTERM" in output
    assert not set(names) & set(netns._list_namespaces())
    assert not wait_gone(inside), "processes from the node namespaces are still alive"


@needs_root
def test_hierarchical_steps_through_torchrun(tmp_path, monkeypatch):
    """2 nodes x 2 processes through torchrun, quant4 and dgc with ``--hierarchy node`` against flat: every rank
    ends bit-identical in both modes, the losses of the first steps agree (the two modes average in another
    order, and quantize different sums once compressed, each within its stochastic rounding: 0.02 nats over 5
    steps of a loss near 5.5; for dgc the loss after its first update: from then on the two modes are different
    algorithms by design, node mode selecting top-k from the node's average velocity and flat mode from each
    rank's, which sends up to M times more entries, and measured here they drift apart by 0.11 nats in 5 steps),
    and hierarchical quant4's uplink carries at most 60% of flat quant4's.

    The formula behind the 60%: with W = 4 ranks, M = 2 per node and C the compressed bytes of a bucket, flat
    quant4 has each rank send (W-1)/W of C in the all-to-all and again in the all-gather, of which (W-M)/(W-1) go
    to the other node, so a node's uplink carries M x 2 (W-M)/W x C = 2 C; hierarchical quant4 has each local
    rank send 2 (N-1)/N of its shard's C/M to the other node (N = 2 nodes), so a node's uplink carries C: 0.5,
    plus headers, DDP's and the harness's small messages on both sides."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runs = {}
    for hierarchy in ("flat", "node"):
        cfg = BenchConfig(workers=4, nodes=2, steps=5, bandwidth="1gbit", hierarchy=hierarchy, **TINY)
        report = run_e2e(["quant4", "dgc"], cfg, verbose=False)
        runs[hierarchy] = {r["method"]: r for r in report["results"]}
    for hierarchy, results in runs.items():
        for name, r in results.items():
            assert r["status"] == "ok", f"{hierarchy} {name}: {r['reason']}"
            assert len(set(r["param_checksums"])) == 1, f"{hierarchy} {name}: ranks differ: {r['param_checksums']}"
    for name, steps in (("quant4", 5), ("dgc", 2)):
        flat, node = runs["flat"][name]["loss_curve"][:steps], runs["node"][name]["loss_curve"][:steps]
        assert max(abs(a - b) for a, b in zip(flat, node)) <= 0.02, (name, flat, node)
    assert runs["flat"]["quant4"]["loss_curve"][0] == runs["node"]["quant4"]["loss_curve"][0]  # same start
    flat_uplink = runs["flat"]["quant4"]["inter_node_bytes_per_node_per_step"]
    node_uplink = runs["node"]["quant4"]["inter_node_bytes_per_node_per_step"]
    assert 0 < node_uplink <= 0.6 * flat_uplink, (node_uplink, flat_uplink)
    assert _my_namespaces(os.getpid()) == []

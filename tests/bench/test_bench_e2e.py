"""Tests of the end-to-end benchmark harness: byte counting, a tiny real run, failure handling, namespace clean-up."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from process_table import running_since, wait_gone
from pycomm.bench import netns
from pycomm.bench.cli import build_parser, main as cli_main
from pycomm.bench.config import MODELS, BenchConfig
from pycomm.bench.e2e import run_e2e
from pycomm.bench.launcher import _failure_reason
from pycomm.bench.methods import DEFAULT_METHODS, DGC_WARMUP_FRACTION, METHODS, dgc_warmup_stage_steps
from pycomm.bench.models import ByteMLP
from pycomm.bench.report import format_table
from pycomm.bench.worker import fp32_allreduce_bytes
from pycomm.traffic import CollectiveByteCounter

REQUIRED_KEYS = {"method", "step_time_s", "bytes_per_worker_per_step", "wire_bytes_per_worker_per_step",
                 "compression_ratio", "final_loss", "shaped"}
ISSUE_METHODS = ("allreduce,fp16,bf16,powersgd1,powersgd2,powersgd4,torch-quant,quant8,quant4,quant2,dgc,topk-ef-adamw,"
                 "lgreco-quant,lgreco-topk,spsa-projection")
ROOT_REASON = netns.shaping_unavailable_reason()
needs_root = pytest.mark.skipif(ROOT_REASON is not None, reason=f"shaping not allowed here: {ROOT_REASON}")


def bench_main(args):
    """``pycomm bench e2e ARGS`` (also ``python -m pycomm.bench e2e ARGS``)."""
    return cli_main(["bench", "e2e", *args])


def _allreduce_counted(rank: int, world: int, numel: int) -> int:
    with CollectiveByteCounter() as counter:
        dist.all_reduce(torch.ones(numel, dtype=torch.float32))
    return counter.bytes_sent


@pytest.mark.parametrize("world", [2, 4])
def test_counter_matches_ring_allreduce_volume(world):
    numel = 1000
    # a ring all-reduce (reduce-scatter then all-gather) sends 2 (W-1) chunks of N/W fp32 elements per rank
    expected = 2 * (world - 1) * numel * 4 // world
    assert run_distributed(_allreduce_counted, world, numel) == [expected] * world


def test_fp32_reference_volume_and_large_model():
    model = ByteMLP()
    n = model.num_parameters()
    assert 24_000_000 <= n <= 28_000_000
    assert fp32_allreduce_bytes(model, 4) == pytest.approx(2 * 3 / 4 * 4 * n, abs=4 * len(list(model.parameters())))
    tokens = torch.randint(0, 256, (3, 40))
    assert model(tokens).shape == (3, 256)
    assert abs(model.loss(tokens, tokens).item() - math.log(256)) < 0.2  # starts near the uniform prediction


def test_cli_names_and_schema_defaults():
    parser = build_parser()
    args = parser.parse_args(["bench", "e2e", "--workers", "4", "--model", "large", "--methods", ISSUE_METHODS,
                              "--steps", "50", "--bandwidth", "100mbit", "--delay", "1ms", "--json", "out.json"])
    assert args.methods == ISSUE_METHODS.split(",") and args.model == "large" and args.bandwidth == "100mbit"
    assert list(DEFAULT_METHODS) == ISSUE_METHODS.split(",")
    assert set(MODELS) == {"lm", "large"} and set(DEFAULT_METHODS) <= set(METHODS)
    for bad in (["--methods", "nope"], ["--bandwidth", "fast"], ["--delay", "soon"], ["--model", "huge"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "e2e", *bad])
    with pytest.raises(ValueError):
        BenchConfig(model="huge")
    assert netns.parse_rate("100mbit") == 1e8 and netns.parse_rate("1gbit") == 1e9
    assert netns.parse_delay("1ms") == pytest.approx(1e-3) and netns.parse_delay("0") == 0


def _hook_options(name, cfg):
    """The keyword arguments ``name``'s row passes to ``pycomm.register`` under ``cfg`` (fixed and run-dependent)."""
    _, kwargs, config_options = METHODS[name].attach.args  # functools.partial(_attach_pycomm, name, kwargs, fn)
    return {**kwargs, **(config_options(cfg) if config_options else {})}


@pytest.mark.parametrize("steps", [30, 44, 45, 134, 135, 200, 600, 900, 1000, 9000])
def test_dgc_warmup_follows_the_run_length(steps):
    """The stated rule: the paper's 4 warm-up stages span 4/90 of the run (steps / 90 per stage, half up),
    none below 45 steps; every DGC-hook row gets it, and the hook's densities follow the paper's schedule."""
    from pycomm.hooks.dgc import PAPER_WARMUP_DENSITIES, DGCState

    assert DGC_WARMUP_FRACTION == pytest.approx(4 / 90)
    stage = dgc_warmup_stage_steps(steps)
    assert stage == (2 * steps + 90) // 180 and (stage == 0) == (steps < 45)  # steps / 90, rounded half up
    cfg = BenchConfig(steps=steps)
    for name in ("dgc", "topk-ef-adamw", "lgreco-topk"):
        assert _hook_options(name, cfg)["warmup_steps"] == stage
    options = _hook_options("dgc", cfg)
    state = DGCState(**{k: options[k] for k in ("density", "momentum", "warmup_steps")})
    densities = [state.density_at(step) for step in range(steps)]
    warmup = sum(d > options["density"] for d in densities)  # steps before the target density
    assert warmup == 4 * stage and abs(warmup - steps * 4 / 90) <= 2  # 4/90 of the run, rounded per stage
    assert sorted(set(densities), reverse=True) == ([*PAPER_WARMUP_DENSITIES] if stage else []) + [0.001]
    assert densities[: 4 * stage] == [d for d in PAPER_WARMUP_DENSITIES for _ in range(stage)]
    with pytest.raises(ValueError):
        dgc_warmup_stage_steps(-1)


def test_topk_ef_adamw_row_is_dgc_without_momentum_under_adamw():
    """The AdamW row: the DGC hook with momentum 0 (top-k + error feedback), at DGC's density, with AdamW at the
    fp32 AdamW baseline's learning rate, clipped after the backward pass like that baseline."""
    cfg = BenchConfig(steps=200)
    row, dgc, baseline = METHODS["topk-ef-adamw"], METHODS["dgc"], METHODS["allreduce"]
    options = _hook_options("topk-ef-adamw", cfg)
    assert row.pycomm_name == "dgc" and options["momentum"] == 0.0
    assert options["density"] == _hook_options("dgc", cfg)["density"] and "clip_norm" not in options
    assert (row.optimizer, dgc.optimizer) == ("adamw", "sgd") and not row.clip_in_hook
    assert row.base_lr(cfg) == baseline.base_lr(cfg) == cfg.lr
    opt = row.make_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


def test_tiny_topk_ef_adamw_run(tmp_path):
    """2 workers, a few steps: top-k with error feedback under AdamW trains, sends ~0.1% and keeps replicas equal."""
    out = tmp_path / "topk.json"
    assert bench_main(["--workers", "2", "--steps", "8", "--methods", "topk-ef-adamw", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["method"] == "topk-ef-adamw" and r["status"] == "ok" and r["optimizer"] == "adamw"
    assert r["replicas_in_sync"] and all(math.isfinite(x) for x in r["loss_curve"])
    assert r["final_loss"] < r["initial_loss"]
    # k values + k indices of each large layer, small layers dense: far below the fp32 all-reduce
    assert 0 < r["bytes_per_worker_per_step"] < r["fp32_allreduce_bytes_per_step"] / 50


def test_failure_reason_names_the_worker_exception():
    log = ("Traceback (most recent call last):\n  File x\ntorch.multiprocessing.spawn.ProcessRaisedException:\n\n"
           "-- Process 1 terminated with the following error:\nTraceback ...\nIndexError: list index out of range\n")
    assert "IndexError: list index out of range" in _failure_reason(log, 1)


def test_tiny_unshaped_run(tmp_path, capsys):
    """2 workers, a few steps, two methods, unshaped; plus an unavailable method row."""
    out = tmp_path / "e2e.json"
    rc = bench_main(["--workers", "2", "--steps", "6", "--methods", "allreduce,quant4,lgreco-quant",
                     "--bandwidth", "100mbit", "--no-shape", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "**Unshaped** (shaping turned off (--no-shape))" in printed and "| allreduce | adamw" in printed
    report = json.loads(out.read_text())
    assert set(report) == {"config", "network", "results"} and report["config"]["workers"] == 2
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["allreduce", "quant4", "lgreco-quant"]
    for name in ("allreduce", "quant4"):
        r = results[name]
        assert REQUIRED_KEYS <= set(r) and r["status"] == "ok" and r["shaped"] is False
        assert r["wire_bytes_per_worker_per_step"] is None
        assert r["step_time_s"] > 0 and math.isfinite(r["final_loss"]) and r["replicas_in_sync"]
        assert r["parallel"] == "ddp" and r["peak_memory_bytes"] == max(r["peak_memory_per_rank"]) > 0
        assert abs(r["initial_loss"] - math.log(256)) < 0.1 and r["final_loss"] < r["initial_loss"]
        # the estimate is the counted bytes of both workers on one 100 Mbit link
        assert r["estimated_link_s_per_step"] == pytest.approx(2 * r["bytes_per_worker_per_step"] * 8 / 1e8)
    allreduce, quant4 = results["allreduce"], results["quant4"]
    # every gradient byte goes through the hook: fp32 all-reduce counts exactly the analytic volume
    assert allreduce["bytes_per_worker_per_step"] == allreduce["fp32_allreduce_bytes_per_step"]
    assert allreduce["compression_ratio"] == 1.0
    assert 0 < quant4["bytes_per_worker_per_step"] < allreduce["bytes_per_worker_per_step"] / 5
    assert quant4["compression_ratio"] > 5
    lgreco = results["lgreco-quant"]
    import pycomm

    if "lgreco" not in pycomm.available_methods():
        assert lgreco["status"] == "unavailable" and "lgreco" in lgreco["reason"]
        assert lgreco["final_loss"] is None and REQUIRED_KEYS <= set(lgreco)
        assert "| lgreco-quant | adamw lr 0.003 | unavailable:" in printed
    table = format_table(report["results"], report["network"])
    assert table.count("\n| ") == 4  # header row, then one row per method


def _crashing_attach(ddp, cfg):
    def hook(state, bucket):
        raise IndexError("deliberate failure in the hook")

    ddp.register_comm_hook(None, hook)


def _hanging_attach(ddp, cfg):
    calls = []

    def hook(state, bucket):
        calls.append(1)
        if dist.get_rank() == 0 and len(calls) > 2:  # from step 2 on rank 0 never joins: the others wait forever
            time.sleep(3600)
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, hook)


def test_crash_and_hang_are_reported_and_cleaned_up(capsys, tmp_path, monkeypatch):
    import tempfile

    from pycomm.bench.methods import MethodSpec

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the launchers' command lines name tmp_path

    methods = {
        "crashes": MethodSpec(attach=_crashing_attach, description="raises in the hook"),
        "hangs": MethodSpec(attach=_hanging_attach, description="rank 0 never joins"),
        "allreduce": METHODS["allreduce"],
    }
    cfg = BenchConfig(workers=2, steps=3, stall_timeout_s=5, start_timeout_s=60)
    report = run_e2e(methods, cfg, verbose=True)
    results = {r["method"]: r for r in report["results"]}
    assert results["crashes"]["status"] == "failed" and "IndexError" in results["crashes"]["reason"]
    assert results["hangs"]["status"] == "failed" and "no progress" in results["hangs"]["reason"]
    assert results["allreduce"]["status"] == "ok"
    printed = capsys.readouterr().out
    assert "FAILED" in printed
    # no launcher or worker of this run is left (forked workers keep the launcher's command line)
    leftovers = subprocess.run(["pgrep", "-f", f"pycomm.bench.launcher --launch {tmp_path}"], capture_output=True,
                               text=True)
    assert leftovers.stdout.strip() == ""


@needs_root
def test_shaped_run_reports_wire_bytes(tmp_path):
    report = run_e2e(["allreduce"], BenchConfig(workers=2, steps=4, bandwidth="1gbit"), verbose=False)
    net = report["network"]
    assert net["shaped"] and "tbf" in net["qdisc"] and "1Gbit" in net["qdisc"]
    r = report["results"][0]
    assert r["shaped"] is True and r["status"] == "ok"
    # what crossed lo includes the counted payload plus TCP/IP and Gloo framing, and not hugely more
    assert r["bytes_per_worker_per_step"] <= r["wire_bytes_per_worker_per_step"] < 2 * r["bytes_per_worker_per_step"]
    assert r["mean_bytes_per_worker_per_step"] <= r["mean_wire_bytes_per_worker_per_step"]
    assert not netns.ShapedNamespace("1gbit", name=net["namespace"]).exists()


@needs_root
def test_namespace_removed_on_sigint_with_workers_inside(tmp_path):
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN: restore the
    # handler a terminal's Ctrl-C meets, else this test fails whenever the suite itself runs in the background.
    script = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from pycomm.bench.cli import main; "
              "sys.exit(main(['bench', 'e2e', '--workers', '2', '--steps', '100000', '--methods', 'allreduce', "
              "'--bandwidth', '1gbit']))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, start_new_session=True)
    mine = f"{netns.NAME_PREFIX}{proc.pid}-"
    # Generous: the workers start slowly on a loaded 2-core machine.
    name, inside, deadline = None, {}, time.monotonic() + 300
    try:
        while time.monotonic() < deadline and len(inside) < 3:  # the launcher and both workers
            time.sleep(0.5)
            names = [n for n in netns._list_namespaces() if n.startswith(mine)]
            if names:
                name = names[0]
                inside = {pid: running_since(pid) for pid in netns._namespace_pids(name)}
        assert name is not None and len(inside) >= 3, "the workers never started inside the namespace"
        os.kill(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            # SIGKILL skips the harness's own clean-up, and the launcher inside the namespace is in
            # another session: remove the namespace (and what runs in it) so a failure leaks nothing.
            for leftover in [n for n in netns._list_namespaces() if n.startswith(mine)]:
                netns.remove_namespace(leftover)
    assert proc.returncode != 0 and "KeyboardInterrupt" in output
    assert name not in netns._list_namespaces()
    alive = wait_gone(inside)
    assert not alive, f"processes {alive} from the namespace are still alive"


@needs_root
def test_namespace_create_remove_is_idempotent():
    net = netns.ShapedNamespace("100mbit", delay="1ms").create()
    try:
        assert net.exists()
        done = subprocess.run(net.exec_prefix() + [sys.executable, "-c",
                              "from pycomm.bench.netns import read_tx_bytes; print(read_tx_bytes())"],
                              capture_output=True, text=True, check=True)
        assert int(done.stdout) >= 0
        assert net.delay_applied or "netem" in (net.delay_note or "")
    finally:
        net.remove()
    net.remove()
    assert not net.exists()


def test_plots_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    from pycomm.bench.report import write_plots

    rows = [{"method": m, "status": "ok", "loss_curve": [5.5, 4.0, 3.5], "step_time_curve_s": [0.1, 0.1, 0.1],
             "bytes_curve": [b, b, b]} for m, b in (("allreduce", 1e6), ("quant4", 1.3e5))]
    rows.append({"method": "powersgd4", "status": "failed", "loss_curve": []})
    paths = write_plots(rows, str(tmp_path / "run"))
    assert [os.path.basename(p) for p in paths] == ["run_loss_vs_time.png", "run_loss_vs_bytes.png"]
    for path in paths:
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def _pretend_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)


def test_nccl_with_more_workers_than_gpus_is_refused(monkeypatch, capsys):
    """NCCL cannot run two ranks on one GPU: refuse before any process starts, with the counts."""
    _pretend_gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"one CUDA GPU per worker: workers=2 but this machine has 1 GPU"):
        BenchConfig(workers=2, backend="nccl").resolved_backend
    with pytest.raises(ValueError, match="workers=2"):
        run_e2e(["allreduce"], BenchConfig(workers=2, steps=1, backend="nccl"), verbose=False)
    assert bench_main(["--backend", "nccl", "--workers", "2", "--steps", "1", "--methods", "allreduce"]) == 2
    assert "one CUDA GPU per worker: workers=2 but this machine has 1 GPU" in capsys.readouterr().err
    # What still runs: NCCL with a GPU per worker, and auto, which picks Gloo when GPUs are short.
    assert BenchConfig(workers=1, backend="nccl").resolved_backend == "nccl"
    assert BenchConfig(workers=2, backend="auto").resolved_backend == "gloo"
    _pretend_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="has 0 GPU"):
        BenchConfig(workers=1, backend="nccl").resolved_backend
    _pretend_gpus(monkeypatch, 2)
    assert BenchConfig(workers=2, backend="nccl").resolved_backend == "nccl"
    assert BenchConfig(workers=2, backend="auto").resolved_backend == "nccl"

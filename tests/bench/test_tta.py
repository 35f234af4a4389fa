"""Tests of the time-to-accuracy benchmark (``pycomm bench tta``): the arithmetic on synthetic curves, the table,
a tiny CI run with estimated step times, and (where shaping is allowed) the fact the method rests on."""

from __future__ import annotations

import json
import math

import pytest

from pycomm.bench import netns
from pycomm.bench import cli
from pycomm.bench.cli import build_parser, main as cli_main
from pycomm.bench.config import BenchConfig
from pycomm.bench.e2e import run_e2e
from pycomm.bench.tta import (COMPOSITION, EXTRA_LINK_TIME, default_target, default_window, estimated_step_time,
                              extra_link_time, format_tta_table, method_record, smooth, steps_to_target,
                              time_to_target)

RECORD_FIELDS = {"method", "steps_to_target", "time_to_target_s", "step_time_s", "final_loss",
                 "bytes_per_worker_per_step"}
ROOT_REASON = netns.shaping_unavailable_reason()
needs_root = pytest.mark.skipif(ROOT_REASON is not None, reason=f"shaping not allowed here: {ROOT_REASON}")


def _reference_smooth(losses, window):
    return [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
            for i in range(len(losses))]


def test_smooth_is_the_trailing_mean():
    losses = [5.0, 4.0, 6.0, 3.0, 2.5, 2.0]
    assert smooth(losses, 1) == losses
    assert smooth(losses, 3) == pytest.approx(_reference_smooth(losses, 3), abs=1e-15)
    assert smooth(losses, 3)[:3] == pytest.approx([5.0, 4.5, 5.0])  # fewer values at the start
    assert smooth(losses, 100)[-1] == pytest.approx(sum(losses) / 6)
    with pytest.raises(ValueError, match="window"):
        smooth(losses, 0)


def test_steps_to_target_reaching_and_never():
    losses = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert steps_to_target(losses, 2.5, window=1) == 4  # counted from 1: after the 4th step
    assert steps_to_target(losses, 10.0, window=1) == 1
    assert steps_to_target(losses, 0.5, window=1) is None  # never reached
    assert steps_to_target([], 1.0, window=1) is None
    # a diverged run never reaches a target, even after its NaN is out of a raw window
    assert steps_to_target([float("nan"), 3.0], 4.0, window=1) == 2
    assert steps_to_target([float("nan"), 3.0], 4.0, window=2) is None
    with pytest.raises(ValueError, match="finite"):
        steps_to_target(losses, float("nan"), window=1)


def test_steps_to_target_noisy_curve_needs_the_window():
    # one lucky batch at step 2 dips below the target; the trend reaches it only at the end
    losses = [3.0, 1.9, 3.0, 2.9, 2.0, 2.0, 2.0]
    assert steps_to_target(losses, 2.0, window=1) == 2
    smoothed = _reference_smooth(losses, 3)
    expected = next(i + 1 for i, v in enumerate(smoothed) if v <= 2.0)
    assert expected == 7
    assert steps_to_target(losses, 2.0, window=3) == 7


def test_steps_to_target_exactly_at_target_counts():
    assert steps_to_target([3.0, 2.0, 1.0], 2.0, window=1) == 2
    assert steps_to_target([4.0, 2.0, 2.0], 2.0, window=2) == 3  # smoothed 4, 3, 2: exactly 2 after step 3
    assert steps_to_target([4.0, 2.0, 2.0], 1.9999999, window=2) is None


def test_default_target_is_the_smoothed_baseline_at_the_fraction():
    baseline = [float(v) for v in range(10, 0, -1)]  # 10, 9, ..., 1
    # after step ceil(0.9 * 10) = 9, the trailing mean of 3: losses 4, 3, 2
    assert default_target(baseline, 0.9, window=3) == pytest.approx(3.0)
    assert default_target(baseline, 1.0, window=1) == 1.0
    assert default_target(baseline, 0.5, window=1) == 6.0
    assert default_target(baseline, 0.01, window=1) == 10.0  # at least the first step
    # the default window is 10% of the run, 1..20 steps
    assert default_window(10) == 1 and default_window(100) == 10 and default_window(1000) == 20
    assert default_target(baseline, 0.9) == default_target(baseline, 0.9, window=1)
    for bad in ({"fraction": 0.0}, {"fraction": 1.5}):
        with pytest.raises(ValueError, match="fraction"):
            default_target(baseline, **bad)
    with pytest.raises(ValueError, match="no losses"):
        default_target([], 0.9)
    with pytest.raises(ValueError, match="no target"):
        default_target([1.0, float("inf"), 2.0], 0.5, window=1)


def test_time_composition_and_estimate():
    assert time_to_target(7, {"100mbit": 0.5, "1gbit": 0.125}) == {"100mbit": 3.5, "1gbit": 0.875}
    assert time_to_target(None, {"100mbit": 0.5}) == {"100mbit": None}
    assert time_to_target(7, {"100mbit": None}) == {"100mbit": None}
    # 2 workers share one 100 Mbit link: 2 x 1e6 bytes x 8 / 1e8 = 0.16 s on top of the unshaped 0.1 s
    assert estimated_step_time(0.1, 1e6, 2, "100mbit") == pytest.approx(0.26)
    assert estimated_step_time(0.1, 1e6, 2, "100mbit", shared_link=False) == pytest.approx(0.18)
    assert estimated_step_time(0.1, 0.0, 4, "1gbit") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rate"):
        estimated_step_time(0.1, 1e6, 2, "fast")


def test_extra_link_time_of_a_warm_up():
    """A warm-up step that sends 9 MB more than the median step costs 4 workers x 9e6 x 8 / 1e8 = 2.88 s more on
    one shared 100 Mbit link; it counts only before the target; the table shows it in brackets."""
    curve = [10e6, 1e6, 1e6, 1e6, 1e6]
    assert extra_link_time(curve, 3, ["100mbit", "1gbit"], 4) == pytest.approx({"100mbit": 2.88, "1gbit": 0.288})
    assert extra_link_time(curve, 3, ["100mbit"], 4, shared_link=False) == pytest.approx({"100mbit": 0.72})
    assert extra_link_time(curve, None, ["100mbit"], 4) == {"100mbit": None}
    assert extra_link_time([], 3, ["100mbit"], 4) == {"100mbit": None}
    record = method_record("dgc", [5.0, 4.0, 3.0, 2.0, 1.0], 3.0, 1, {"100mbit": 1.0}, 1.0, 1e6,
                           bytes_curve=curve, workers=4)
    assert record["steps_to_target"] == 3 and record["time_to_target_s"] == {"100mbit": 3.0}
    assert record["extra_link_time_s"]["100mbit"] == pytest.approx(2.88) and record["bytes_curve"] == curve
    report = {"config": {"target_loss": 3.0, "target_source": "given", "window": 1, "bandwidths": ["100mbit"],
                         "step_time_source": {"100mbit": "measured: ..."},
                         "bench": BenchConfig(workers=4, steps=5).to_dict()},
              "results": [record]}
    table = format_tta_table(report)
    assert "| dgc | 3 | 3.0 s (1.000 s/step) [+2.9 s] |" in table and EXTRA_LINK_TIME in table


def test_record_and_table_say_never_and_failed():
    times = {"100mbit": 0.4, "1gbit": 0.1}
    reached = method_record("allreduce", [5.0, 3.0, 2.0], 3.0, 1, times, 2.0, 1000.0)
    never = method_record("quant2", [5.0, 4.0, 3.5], 3.0, 1, times, 3.5, 100.0)
    failed = method_record("powersgd4", [], 3.0, 1, {"100mbit": None, "1gbit": None}, None, None,
                           status="failed", reason="worker crashed: gloo | EnforceNotMet")
    assert RECORD_FIELDS <= set(reached)
    assert reached["steps_to_target"] == 2 and reached["time_to_target_s"] == {"100mbit": 0.8, "1gbit": 0.2}
    assert never["steps_to_target"] is None and never["time_to_target_s"] == {"100mbit": None, "1gbit": None}
    assert failed["steps_to_target"] is None and failed["reason"].startswith("worker crashed")
    report = {"config": {"target_loss": 3.0, "target_source": "given (--target-loss)", "window": 1,
                         "bandwidths": ["100mbit", "1gbit"],
                         "step_time_source": {"100mbit": "estimate (--estimate): ...", "1gbit": "measured: ..."},
                         "bench": BenchConfig(workers=2, steps=3).to_dict()},
              "results": [reached, never, failed]}
    table = format_tta_table(report)
    assert COMPOSITION in table and "**ESTIMATED** s/step at 100mbit:" in table
    assert "| time to target @ 100mbit (est.) | time to target @ 1gbit |" in table
    assert "| allreduce | 2 | 0.8 s (0.400 s/step) | 0.2 s (0.100 s/step) | 2.000 | 1,000 |" in table
    assert "| quant2 | never | never (0.400 s/step) | never (0.100 s/step) | 3.500 | 100 |" in table
    assert "| powersgd4 | failed: worker crashed: gloo \\| EnforceNotMet |" in table


def test_plot_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    from pycomm.bench.tta import write_tta_plot

    times = {"100mbit": 0.4, "1gbit": 0.1}
    report = {"config": {"target_loss": 3.0, "window": 2, "bandwidths": ["100mbit", "1gbit"]},
              "results": [method_record("allreduce", [5.0, 3.0, 2.0], 3.0, 2, times, 2.0, 1000.0)]}
    path = tmp_path / "tta.png"
    assert write_tta_plot(report, str(path)) == str(path) and path.stat().st_size > 0


def test_cli_options():
    parser = build_parser()
    args = parser.parse_args(["bench", "tta", "--methods", "allreduce,quant4", "--bandwidths", "100mbit, 1gbit",
                              "--estimate", "--target-loss", "2.5", "--out", "x.json"])
    assert args.bandwidths == ["100mbit", "1gbit"] and args.estimate and args.target_loss == 2.5
    assert parser.parse_args(["bench", "tta"]).bandwidths == ["100mbit", "1gbit", "10gbit"]
    for bad in (["--bandwidths", "fast"], ["--bandwidths", ","], ["--fraction", "0"], ["--fraction", "1.1"],
                ["--window", "0"], ["--methods", "nope"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "tta", *bad])


def test_e2e_tta_mode_is_the_tta_command(monkeypatch, capsys):
    """`bench e2e --tta` hands run_tta exactly what `bench tta` does; --no-shape means --estimate."""
    calls = []
    monkeypatch.setattr(cli, "run_tta", lambda methods, config, **kw: calls.append((methods, config, kw)))
    common = ["--model", "lm", "--workers", "2", "--methods", "quant4", "--bandwidths", "100mbit,1gbit",
              "--target-loss", "2.5", "--timing-steps", "3", "--out", "t.json"]
    assert cli.main(["bench", "tta", *common, "--estimate"]) == 0
    assert cli.main(["bench", "e2e", "--tta", *common, "--no-shape"]) == 0
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0][1].steps == cli.TTA_STEPS and calls[0][2]["estimate"] and calls[0][2]["json_path"] == "t.json"

    assert cli.main(["bench", "e2e", "--tta", "--bandwidth", "1gbit"]) == 2
    assert "--bandwidths" in capsys.readouterr().err and len(calls) == 2

    runs = []
    monkeypatch.setattr(cli, "run_e2e", lambda methods, config, **kw: runs.append(config))
    assert cli.main(["bench", "e2e", "--methods", "quant4", "--no-shape"]) == 0
    assert runs[0].steps == BenchConfig.steps and len(calls) == 2


def test_tiny_tta_run_with_estimates(tmp_path, capsys):
    """The CI run: 2 workers, 2 methods, unshaped, estimated step times at two bandwidths."""
    out, md = tmp_path / "tta.json", tmp_path / "tta.md"
    rc = cli_main(["bench", "tta", "--workers", "2", "--steps", "6", "--methods", "quant4",
                   "--estimate", "--bandwidths", "100mbit,1gbit", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    report = json.loads(out.read_text())
    config = report["config"]
    assert config["estimate"] is True and config["bandwidths"] == ["100mbit", "1gbit"]
    assert config["composition"] == COMPOSITION and config["window"] == 1 and config["fraction"] == 0.9
    assert all(how.startswith("estimate (--estimate)") for how in config["step_time_source"].values())
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["allreduce", "quant4"]  # the baseline is added to set the target
    assert config["target_loss"] == default_target(results["allreduce"]["loss_curve"], 0.9, 1)
    rates = {"100mbit": 1e8, "1gbit": 1e9}
    for r in results.values():
        assert RECORD_FIELDS <= set(r) and r["status"] == "ok" and len(r["loss_curve"]) == 6
        assert math.isfinite(r["final_loss"]) and r["bytes_per_worker_per_step"] > 0
        assert r["steps_to_target"] == steps_to_target(r["loss_curve"], config["target_loss"], 1)
        for bw, rate in rates.items():
            assert r["step_time_s"][bw] == pytest.approx(
                r["unshaped_step_time_s"] + 2 * r["bytes_per_worker_per_step"] * 8 / rate)
            if r["steps_to_target"] is None:
                assert r["time_to_target_s"][bw] is None
            else:
                assert r["time_to_target_s"][bw] == pytest.approx(r["steps_to_target"] * r["step_time_s"][bw])
    # the baseline reaches its own target at the latest after 90% of its run (6 steps: step 6)
    assert results["allreduce"]["steps_to_target"] is not None and results["allreduce"]["steps_to_target"] <= 6
    # fewer bytes: quant4's estimated link time is the smaller one
    quant4, allreduce = results["quant4"], results["allreduce"]
    assert (quant4["step_time_s"]["100mbit"] - quant4["unshaped_step_time_s"]
            < (allreduce["step_time_s"]["100mbit"] - allreduce["unshaped_step_time_s"]) / 5)
    table = md.read_text()
    assert "**ESTIMATED** s/step at 100mbit, 1gbit" in table and "| allreduce |" in table
    assert "| quant4 |" in table and table == format_tta_table(report) + "\n"
    assert "Time to accuracy" in capsys.readouterr().out


def test_given_target_without_baseline(tmp_path):
    out = tmp_path / "tta.json"
    # a target that nobody reaches in 2 steps: "never", and no allreduce row is added
    rc = cli_main(["bench", "tta", "--workers", "2", "--steps", "2", "--methods", "quant4", "--estimate",
                   "--bandwidths", "1gbit", "--target-loss", "0.5", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["quant4"]
    assert report["config"]["target_source"] == "given (--target-loss)"
    r = report["results"][0]
    assert r["steps_to_target"] is None and r["time_to_target_s"] == {"1gbit": None}


@needs_root
def test_loss_after_step_s_does_not_depend_on_the_link():
    """The fact tta rests on: the shaped run's losses are the unshaped curve's, step by step."""
    cfg = BenchConfig(workers=2, steps=3)
    unshaped = run_e2e(["allreduce", "quant4"], cfg, verbose=False)
    shaped = run_e2e(["allreduce", "quant4"], BenchConfig(workers=2, steps=3, bandwidth="100mbit"), verbose=False)
    assert shaped["network"]["shaped"] and not unshaped["network"]["shaped"]
    for a, b in zip(unshaped["results"], shaped["results"]):
        assert a["status"] == b["status"] == "ok"
        assert a["loss_curve"] == b["loss_curve"]  # bit-identical: same batches, same deterministic collectives


def test_timing_runs_time_the_steady_state_of_l_greco(monkeypatch):
    """The shaped timing runs are steady-state runs: L-GreCo solves once, after the inner hook's last
    uncompressed step, so the median of the timed steps is a step with per-layer settings and no solve.
    Scaled to a 5-step run, the ordinary schedule solves after every step from the third (measured on the
    large model: 16.2 s per step at 100 Mbit against 2.24 s per step over the 300-step curve)."""
    from pycomm.bench import tta
    from pycomm.bench.methods import _lgreco_options
    from pycomm.hooks.lgreco import LGreCoState

    seen = []
    monkeypatch.setattr(tta, "shaping_unavailable_reason", lambda: None)
    monkeypatch.setattr(tta, "run_e2e", lambda names, cfg, **kw: seen.append(cfg) or {
        "network": {"shaped": True}, "results": []})
    tta._timing_runs(["lgreco-quant"], BenchConfig(steps=300), ["1gbit"], 5, False, True, None, False)
    assert [(c.steps, c.steady_state) for c in seen] == [(5, True)]

    def solves(cfg, family):
        state = LGreCoState(family=family, **_lgreco_options(cfg))
        return sorted({state._next_solve_end(step) - 1 for step in range(cfg.steps)} & set(range(cfg.steps)))

    for family in ("quant", "topk"):
        assert solves(seen[0], family) == [1], family  # after step 1 only; steps 2-4 are timed as they run
        assert solves(BenchConfig(steps=5), family) == [2, 3, 4], family  # what the e2e schedule does
        assert solves(BenchConfig(steps=300), family) == [59, 134, 209, 284], family

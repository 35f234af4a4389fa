"""Smoke test of bench/hook_step_time.py: one tree (this checkout), one method, 2 timed steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hook_step_time():
    spec = importlib.util.spec_from_file_location("hook_step_time", ROOT / "bench" / "hook_step_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_tree_one_method_report(hook_step_time, tmp_path):
    report = hook_step_time.run_benchmark({"here": str(ROOT)}, ["quant4"], steps=2, repeats=1, warmup=3,
                                          timeout_s=300)
    summary = report["results"]["here"]["quant4"]
    assert summary["status"] == "ok", summary.get("log_tail")
    assert list(report["results"]) == ["here"] and list(report["results"]["here"]) == ["quant4"]
    assert report["order"] == [[0, "quant4", "here"]]
    assert report["ratios"] == {}
    assert len(summary["step_s"]) == 1 and len(summary["step_s"][0]) == 2
    assert all(t > 0 for t in summary["step_s"][0])
    assert len(summary["cpu_s"][0]) == 2 and all(t > 0 for t in summary["cpu_s"][0])
    assert summary["median_step_s"] > 0 and summary["mean_step_s"] > 0
    assert report["config"]["options"]["quant4"] == {"bits": 4}
    json.loads(json.dumps(report))  # the --out file is plain JSON
    table = hook_step_time.format_markdown(report)
    assert "| quant4 |" in table


def test_bad_arguments_are_refused(hook_step_time, tmp_path):
    with pytest.raises(ValueError, match="no built pycomm"):
        hook_step_time.run_benchmark({"empty": str(tmp_path)}, ["plain"], steps=1, repeats=1)
    with pytest.raises(ValueError, match="unknown method"):
        hook_step_time.run_benchmark({"here": str(ROOT)}, ["quant3"], steps=1, repeats=1)
    with pytest.raises(ValueError, match="warmup >= 3"):
        hook_step_time.run_benchmark({"here": str(ROOT)}, ["plain"], steps=1, repeats=1, warmup=1)

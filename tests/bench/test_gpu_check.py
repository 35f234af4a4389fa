"""make gpu-check's own logic, on the CPU: arguments, budget, stage isolation, timeouts, reports."""

import importlib.util
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


gc = _load("pycomm_gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))


def _stage(name, outcome, needs_gpu=False, weight=1.0, calls=None):
    """A stage that records its time limit and returns ``outcome`` (or raises it)."""

    def fn(ctx, timeout_s):
        if calls is not None:
            calls.append((name, timeout_s))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return gc.Stage(name, fn, weight, needs_gpu)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# -- arguments ---------------------------------------------------------------------------------

def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args([])
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_missing_out_folder_is_created_with_parents(tmp_path):
    args = gc.parse_args(["--out", str(tmp_path / "a" / "b")])
    assert os.path.isdir(tmp_path / "a" / "b")
    assert args.budget_s == gc.DEFAULT_BUDGET_S == 480.0
    assert args.stages is None


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--out", str(tmp_path / "f")])
    assert e.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_out_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--out", str(tmp_path / "f" / "sub")])
    assert e.value.code == 2
    assert "cannot create the output folder" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["abc", "-1", "0", "nan", "inf", "4.9"])
def test_bad_budget_is_refused(tmp_path, capsys, budget):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--out", str(tmp_path), "--budget-s", budget])
    assert e.value.code == 2
    assert "budget" in capsys.readouterr().err


def test_budget_and_stages_are_parsed(tmp_path):
    args = gc.parse_args(["--out", str(tmp_path), "--budget-s", "90.5", "--stages", "build, cuda-tests"])
    assert args.budget_s == 90.5
    assert args.stages == ["build", "cuda-tests"]


def test_unknown_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--out", str(tmp_path), "--stages", "build,tests"])
    assert e.value.code == 2
    assert "unknown stage(s) tests" in capsys.readouterr().err


# -- running stages ----------------------------------------------------------------------------

def test_a_failing_or_raising_stage_does_not_stop_the_next(tmp_path):
    stages = [_stage("raises", RuntimeError("boom")), _stage("fails", (gc.FAILED, "exit code 1", {})),
              _stage("works", (gc.OK, "", {"n": 3}))]
    results = gc.run_stages(stages, gc.Context(str(tmp_path)), 100.0)
    assert [(r.name, r.status) for r in results] == [("raises", "failed"), ("fails", "failed"), ("works", "ok")]
    assert "RuntimeError: boom" in results[0].reason
    assert "RuntimeError: boom" in (tmp_path / "raises.log").read_text()
    assert results[0].log == "raises.log"
    assert results[0].details == {"time_limit_s": pytest.approx(100.0 / 3, abs=0.1)}
    assert results[2].details == {"time_limit_s": pytest.approx(100.0, abs=0.1), "n": 3}  # all that is left
    assert not gc.overall_ok(results)


def test_time_limits_share_what_is_left_by_weight():
    clock, calls = FakeClock(), []

    def spend(seconds):
        def fn(ctx, timeout_s):
            calls.append(timeout_s)
            clock.now += seconds
            return gc.OK, "", {}
        return fn

    stages = [gc.Stage("a", spend(10.0), 1.0, False), gc.Stage("b", spend(50.0), 2.0, False),
              gc.Stage("c", spend(0.0), 1.0, False)]
    results = gc.run_stages(stages, gc.Context("."), 100.0, clock=clock)
    # a: 100 * 1/4; b: the 90 left * 2/3; c: all of the 40 left.
    assert calls == [pytest.approx(25.0), pytest.approx(60.0), pytest.approx(40.0)]
    assert [r.duration_s for r in results] == [10.0, 50.0, 0.0]


def test_a_spent_budget_skips_the_remaining_stages():
    clock = FakeClock()

    def hog(ctx, timeout_s):
        clock.now += 98.0
        return gc.TIMEOUT, "stopped", {}

    stages = [gc.Stage("hog", hog, 1.0, False), _stage("next", (gc.OK, "", {}))]
    results = gc.run_stages(stages, gc.Context("."), 100.0, clock=clock)
    assert results[1].status == "skipped" and results[1].reason == "time budget spent (2 s left)"
    assert not gc.overall_ok(results)


def test_gpu_stages_are_skipped_without_a_gpu(tmp_path):
    def probe(ctx, timeout_s):
        ctx.environment["gpu_count"] = 0
        return gc.FAILED, "torch sees no CUDA GPU on this machine", {}

    calls = []
    stages = [gc.Stage("environment", probe, 1.0, False), _stage("build", (gc.OK, "", {}), True, calls=calls)]
    results = gc.run_stages(stages, gc.Context(str(tmp_path)), 100.0)
    assert calls == []
    assert (results[1].status, results[1].reason) == ("skipped", "no CUDA GPU")


def test_stages_left_out_are_skipped_and_do_not_fail_the_run(tmp_path):
    calls = []
    stages = [_stage("a", (gc.OK, "", {}), calls=calls), _stage("b", (gc.FAILED, "x", {}), calls=calls)]
    results = gc.run_stages(stages, gc.Context(str(tmp_path)), 100.0, selected=["a"])
    assert [c[0] for c in calls] == ["a"] and calls[0][1] == pytest.approx(100.0, abs=0.1)
    assert (results[1].status, results[1].reason) == ("skipped", gc.NOT_SELECTED)
    assert gc.overall_ok(results)


def test_a_command_past_its_limit_is_killed_and_reported(tmp_path):
    log = str(tmp_path / "slow.log")
    start = time.monotonic()
    outcome = gc.run_command(["sleep", "30"], log, 0.5)
    assert outcome.timed_out and outcome.returncode is None
    assert time.monotonic() - start < 10
    assert "stopped after" in open(log).read()
    assert gc.command_status(outcome, "sleep")[0] == "timeout"


def test_a_stage_cut_by_its_time_limit_is_a_timeout(tmp_path):
    def slow(ctx, timeout_s):
        return gc.command_status(ctx.run("slow", ["sleep", "30"], timeout_s), "sleep") + ({},)

    stages = [gc.Stage("slow", slow, 1.0, False), _stage("after", (gc.OK, "", {}))]
    start = time.monotonic()
    results = gc.run_stages(stages, gc.Context(str(tmp_path)), 2.0, min_stage_s=0.1)  # 1 s each
    assert time.monotonic() - start < 10
    assert results[0].status == "timeout" and "time limit" in results[0].reason
    assert results[1].status == "ok"


def test_a_command_that_finishes_reports_its_exit_code(tmp_path):
    log = str(tmp_path / "x.log")
    outcome = gc.run_command([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], log, 60)
    assert (outcome.returncode, outcome.timed_out) == (3, False)
    assert "hello" in open(log).read()
    assert gc.command_status(outcome, "python") == ("failed", "python exited with code 3")


# -- reports -----------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="5" time="1.0">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad[2]" time="0.1"><failure message="assert 1 == 2">x</failure></testcase>
<testcase classname="tests.test_b" name="test_err" time="0.1"><error message="fixture">y</error></testcase>
<testcase classname="tests.test_b" name="test_s1" time="0"><skipped type="pytest.skip" message="no GPU">z</skipped></testcase>
<testcase classname="tests.test_b" name="test_s2" time="0"><skipped type="pytest.skip" message="no GPU">z</skipped></testcase>
</testsuite></testsuites>
"""


def test_parse_junit(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    assert gc.parse_junit(str(path)) == {
        "tests": 5, "passed": 1, "failed": 1, "errors": 1, "skipped": 2,
        "failing": ["tests.test_a::test_bad[2]", "tests.test_b::test_err"], "skip_reasons": {"no GPU": 2}}
    assert gc.parse_junit(str(path), max_names=1)["failing_not_listed"] == 1


def _pytest_runner(junit_text, returncode=0):
    """A command runner that writes ``junit_text`` where pytest's --junitxml points."""

    def runner(argv, log_path, timeout_s, env, cwd):
        junit = next(a.split("=", 1)[1] for a in argv if a.startswith("--junitxml="))
        with open(junit, "w") as f:
            f.write(junit_text)
        return gc.CommandOutcome(returncode, False, 0.1)

    return runner


def test_pytest_stage_reports_counts_and_failures(tmp_path):
    ctx = gc.Context(str(tmp_path), runner=_pytest_runner(JUNIT, returncode=1))
    status, reason, details = gc.stage_cuda_tests(ctx, 60)
    assert (status, reason) == ("failed", "1 failed, 1 errors")
    assert details["failing"] == ["tests.test_a::test_bad[2]", "tests.test_b::test_err"]


def test_pytest_stage_with_every_test_skipped_fails(tmp_path):
    skipped = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="2" tests="2" time="1.0">
<testcase classname="t" name="a"><skipped message="no GPU">z</skipped></testcase>
<testcase classname="t" name="b"><skipped message="no GPU">z</skipped></testcase>
</testsuite></testsuites>
"""
    ctx = gc.Context(str(tmp_path), runner=_pytest_runner(skipped))
    status, reason, details = gc.stage_hooks(ctx, 60)
    assert (status, reason) == ("failed", "every test was skipped")
    assert details["skipped"] == details["tests"] == 2


def test_cuda_test_files_include_every_file_using_cuda_support():
    files = gc.cuda_test_files(ROOT)
    assert files[:4] == list(gc.EXPLICIT_CUDA_TEST_FILES)
    assert "tests/hooks/test_hooks_cuda.py" in files and "tests/bench/test_gpu_check.py" not in files
    assert "tests/ops/test_cuda_ops.py" in files


def test_benchmark_stage_reports_ratios(tmp_path):
    bench = {"datetime": "d", "benchmarks": [
        {"name": "test_q_pycomm[cuda-4]", "group": "q-cuda", "stats": {"median": 0.002}},
        {"name": "test_q_clone[cuda]", "group": "q-cuda", "stats": {"median": 0.001}},
        {"name": "test_q_torch[cuda]", "group": "q-cuda", "stats": {"median": 0.010}}]}

    def runner(argv, log_path, timeout_s, env, cwd):
        assert argv[-2:] == ["-k", "cuda"] and "--benchmark-only" in argv
        path = next(a.split("=", 1)[1] for a in argv if a.startswith("--benchmark-json="))
        with open(path, "w") as f:
            json.dump(bench, f)
        return gc.CommandOutcome(0, False, 0.1)

    status, reason, details = gc.stage_benchmarks(gc.Context(str(tmp_path), runner=runner), 60)
    assert status == "ok"
    row = next(r for r in details["ratios"] if r["kernel"] == "q_pycomm[cuda-4]")
    assert row["vs_clone"] == pytest.approx(2.0) and row["speedup_vs_torch"] == pytest.approx(5.0)
    assert "| q-cuda | q_pycomm[cuda-4] | 2.000 | 2.00x | 5.0x |" in (tmp_path / "benchmarks.log").read_text()


RESULTS = [
    gc.StageResult("environment", "ok", 2.04, "", "environment.log", {"time_limit_s": 19.2}),
    gc.StageResult("build", "timeout", 230.0, "the CUDA build stopped at the stage's time limit (230 s)",
                   "build.log", {"time_limit_s": 230.0, "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"}),
    gc.StageResult("cuda-tests", "failed", 40.5, "1 failed, 0 errors", "cuda-tests.log",
                   {"time_limit_s": 100.0, "tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1,
                    "failing": ["tests.test_x::test_y"], "skip_reasons": {"a | b": 1}}),
    gc.StageResult("benchmarks", "skipped", 0.0, "time budget spent (3 s left)"),
]
ENVIRONMENT = {"torch": "2.11.0+cu130", "gpu": "NVIDIA H200", "capability": "9.0"}

EXPECTED_MARKDOWN = """# pycomm gpu-check: FAILED

Started 2026-01-02 03:04:05 UTC; 272.5 s of a 480 s budget.

## Environment

| | |
|---|---|
| torch | 2.11.0+cu130 |
| gpu | NVIDIA H200 |
| capability | 9.0 |

## Stages

| stage | status | time (s) | limit (s) | notes | log |
|---|---|---:|---:|---|---|
| environment | ok | 2.0 | 19.2 |  | environment.log |
| build | timeout | 230.0 | 230.0 | the CUDA build stopped at the stage's time limit (230 s) | build.log |
| cuda-tests | failed | 40.5 | 100.0 | 1 failed, 0 errors | cuda-tests.log |
| benchmarks | skipped | 0.0 |  | time budget spent (3 s left) |  |

## cuda-tests

1 passed, 1 failed, 0 errors, 1 skipped, of 3.

Failing:

- `tests.test_x::test_y`

Skipped:

- 1 x a \\| b
"""


def test_summary_markdown_is_exact():
    assert gc.summary_markdown(RESULTS, ENVIRONMENT, "2026-01-02 03:04:05 UTC", 480.0) == EXPECTED_MARKDOWN


def test_summary_files(tmp_path):
    gc.write_summary(str(tmp_path), RESULTS, ENVIRONMENT, "2026-01-02 03:04:05 UTC", 480.0)
    assert (tmp_path / "summary.md").read_text() == EXPECTED_MARKDOWN
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data == {
        "ok": False, "started": "2026-01-02 03:04:05 UTC", "budget_s": 480.0, "duration_s": 272.5,
        "environment": ENVIRONMENT,
        "stages": [
            {"name": "environment", "status": "ok", "duration_s": 2.0, "reason": "", "log": "environment.log",
             "details": {"time_limit_s": 19.2}},
            {"name": "build", "status": "timeout", "duration_s": 230.0,
             "reason": "the CUDA build stopped at the stage's time limit (230 s)", "log": "build.log",
             "details": {"time_limit_s": 230.0, "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"}},
            {"name": "cuda-tests", "status": "failed", "duration_s": 40.5, "reason": "1 failed, 0 errors",
             "log": "cuda-tests.log", "details": RESULTS[2].details},
            {"name": "benchmarks", "status": "skipped", "duration_s": 0.0, "reason": "time budget spent (3 s left)",
             "log": "", "details": {}},
        ]}


def test_summary_shows_benchmark_ratios_and_losses():
    result = gc.StageResult("benchmarks", "ok", 1.0, details={"ratios": [
        {"group": "g", "kernel": "k_pycomm", "median_s": 0.0015, "vs_clone": 1.5, "speedup_vs_torch": 4.0},
        {"group": "g", "kernel": "k_clone", "median_s": 0.001, "vs_clone": None, "speedup_vs_torch": None}]})
    hooks = gc.StageResult("hooks-one-gpu", "ok", 1.0, details={"rank0_losses": {
        "2": {"quant cuda": [1.0, 0.25]}, "4": {"error": "rank 1 hung"}}})
    text = gc.summary_markdown([hooks, result], {}, "t", 60.0)
    assert "| g | k_pycomm | 1.500 | 1.50x | 4.0x |\n| g | k_clone | 1.000 |  |  |" in text
    assert "- W=2 quant cuda: 1 -> 0.25\n- W=4 error: rank 1 hung" in text


def test_main_writes_the_summary_and_fails_when_a_stage_fails(tmp_path, capsys):
    stages = [_stage("environment", (gc.OK, "", {})), _stage("build", (gc.FAILED, "exit code 1", {}))]
    code = gc.main(["--out", str(tmp_path / "out"), "--budget-s", "60"], stages=stages)
    assert code == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["ok"] is False
    assert "gpu-check FAILED" in capsys.readouterr().out
    assert gc.main(["--out", str(tmp_path / "out2")], stages=stages[:1]) == 0

"""Tests of the demo job: corpus, model, and a short end-to-end DDP run via the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pycomm.bench.cli import build_parser, main
from pycomm.bench.config import SGD_LR, SPSA_EPS, SPSA_LR
from pycomm.bench.data import VOCAB_SIZE, eval_batches, load_corpus, train_batch, train_generator
from pycomm.bench.demo import DEMO_METHODS, DemoConfig
from pycomm.bench.methods import METHODS, PROJECTION_DIRECTIONS, MethodSpec
from pycomm.bench.models import CharTransformer, ModelConfig
from pycomm.bench.report import format_table


LN_VOCAB = math.log(VOCAB_SIZE)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=200_000)


def test_corpus_is_deterministic_real_text(corpus):
    again = load_corpus(max_bytes=200_000)
    assert corpus.num_bytes == 200_000
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.held_out, again.held_out)
    text = bytes(corpus.train[:20_000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text


def test_batches_per_rank_and_eval_set(corpus):
    x0, y0 = train_batch(corpus, 4, 32, train_generator(seed=0, rank=0))
    x0b, _ = train_batch(corpus, 4, 32, train_generator(seed=0, rank=0))
    x1, _ = train_batch(corpus, 4, 32, train_generator(seed=0, rank=1))
    assert x0.shape == y0.shape == (4, 32) and x0.dtype == torch.int64
    assert torch.equal(x0, x0b) and not torch.equal(x0, x1)
    assert torch.equal(x0[:, 1:], y0[:, :-1])
    ev = eval_batches(corpus, 3, 2, 16)
    assert len(ev) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(ev, eval_batches(corpus, 3, 2, 16)))


def test_model_shapes_and_initial_loss(corpus):
    torch.manual_seed(0)
    model = CharTransformer(ModelConfig(context=32, n_layer=1, d_model=64, n_head=2))
    x, y = train_batch(corpus, 2, 32, train_generator(0, 0))
    assert model(x).shape == (2, 32, VOCAB_SIZE)
    assert abs(model.loss(x, y).item() - LN_VOCAB) < 0.1
    assert any(p.dim() == 2 and p.numel() >= 64 * 64 for p in model.parameters())
    assert any(p.dim() == 1 for p in model.parameters())


def test_cli_parser_defaults():
    args = build_parser().parse_args(["demo"])
    assert args.workers == 4 and args.methods == list(DEMO_METHODS) and args.json is None
    assert set(DEMO_METHODS) <= set(METHODS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--methods", "no_such_method"])


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--workers", "2", "--steps", "30", "--methods", "allreduce,quant4", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method | optimizer | final loss | eval loss | eval acc | s/step | speed vs allreduce |" in printed
    assert "| allreduce | adamw lr 0.003 |" in printed and "| quant4 | adamw lr 0.003 |" in printed

    report = json.loads(out.read_text())
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["allreduce", "quant4"]
    table = format_table(report["results"])
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows == table.splitlines()[:4]  # the header, the rule and 2 rows, then the footnote
    assert "Peak mem/rank" in table
    for r in results.values():
        assert r["workers"] == 2 and r["steps"] == 30
        assert abs(r["initial_loss"] - LN_VOCAB) < 0.1
        assert r["status"] == "ok" and 0 < r["eval_accuracy"] < 1
        for key in ("final_loss", "eval_loss", "step_time_s"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["final_loss"] < LN_VOCAB - 1.5
        assert r["eval_loss"] < LN_VOCAB - 1.5
        assert r["replicas_in_sync"]
    allreduce, quant4 = results["allreduce"], results["quant4"]
    # the hook sees every gradient byte: fp32 all-reduce is exactly the analytic figure
    assert allreduce["bytes_per_worker_per_step"] == pytest.approx(allreduce["fp32_allreduce_bytes_per_step"], rel=0.01)
    assert 0 < quant4["bytes_per_worker_per_step"] < allreduce["bytes_per_worker_per_step"] / 5
    assert quant4["compression_ratio"] > 5


def test_method_optimizers_and_schedule():
    cfg = DemoConfig(steps=50)
    params = [torch.nn.Parameter(torch.zeros(3))]
    adamw, sgd_m, sgd = (METHODS[n].make_optimizer(params, cfg) for n in ("allreduce", "allreduce-sgd", "dgc"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == cfg.lr
    assert isinstance(sgd_m, torch.optim.SGD) and sgd_m.defaults["momentum"] == 0.9
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.0  # DGC's momentum is in the hook
    assert sgd.defaults["weight_decay"] == cfg.weight_decay
    for step in (0, 4, 5, 30, 49):  # same schedule shape, scaled to the method's peak
        assert METHODS["dgc"].lr_at(cfg, step) == pytest.approx(cfg.lr_at(step) * SGD_LR / cfg.lr)
        assert METHODS["allreduce"].lr_at(cfg, step) == pytest.approx(cfg.lr_at(step))
    assert METHODS["dgc"].clip_in_hook and not METHODS["allreduce-sgd"].clip_in_hook
    assert DEMO_METHODS[-6:] == ("allreduce-sgd", "dgc", "lgreco-quant", "lgreco-topk", "spsa-projection", "spsa")
    spsa = METHODS["spsa"]
    assert spsa.zeroth_order and spsa.attach is None and spsa.lr_at(cfg, 30) == pytest.approx(
        cfg.lr_at(30) * SPSA_LR / cfg.lr
    )
    model = torch.nn.Linear(3, 1)
    opt = spsa.make_optimizer(model, cfg)
    assert (opt.lr, opt.eps, opt.seed, opt.model) == (SPSA_LR, SPSA_EPS, cfg.seed, model)
    assert METHODS["spsa-projection"].optimizer == "adamw" and not METHODS["spsa-projection"].zeroth_order
    with pytest.raises(ValueError):
        MethodSpec(attach=None, description="a DDP method needs a hook")
    with pytest.raises(ValueError):
        MethodSpec(attach=lambda ddp, cfg: None, description="spsa has no hook", optimizer="spsa")


def test_demo_dgc_sends_far_less(tmp_path, capsys):
    out = tmp_path / "dgc.json"
    rc = main(["demo", "--workers", "2", "--steps", "20", "--methods", "allreduce-sgd,dgc", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"| dgc | sgd lr {SGD_LR:g} |" in printed and "sgd = SGD(momentum=0)" in printed

    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    dense, dgc = results["allreduce-sgd"], results["dgc"]
    assert (dense["optimizer"], dgc["optimizer"]) == ("sgd-momentum", "sgd")
    assert dense["bytes_per_worker_per_step"] == pytest.approx(dense["fp32_allreduce_bytes_per_step"], rel=0.01)
    # 0.1% of each large layer as k fp32 values + k int32 indices, small layers dense: ~100x less on 2 ranks
    assert 0 < dgc["bytes_per_worker_per_step"] < dense["bytes_per_worker_per_step"] / 50
    assert dgc["compression_ratio"] > 50
    for r in (dense, dgc):
        assert all(math.isfinite(x) for x in r["loss_curve"])
        assert math.isfinite(r["eval_loss"]) and r["final_loss"] < r["initial_loss"]
        assert r["replicas_in_sync"]


def test_demo_spsa_one_byte_and_projection(tmp_path, capsys):
    workers, steps = 2, 12
    out = tmp_path / "spsa.json"
    rc = main(["demo", "--workers", str(workers), "--steps", str(steps), "--methods", "spsa-projection,spsa",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"| spsa | spsa lr {SPSA_LR:g} eps {SPSA_EPS:g} |" in printed and "spsa = pycomm.zo.SPSA" in printed

    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    spsa, proj = results["spsa"], results["spsa-projection"]
    # one all_gather of one byte per step: the byte goes to each of the W-1 peers, every step
    assert spsa["bytes_per_worker_per_step"] == spsa["mean_bytes_per_worker_per_step"] == workers - 1
    assert spsa["collective_calls_per_step"] == 1
    assert spsa["compression_ratio"] == spsa["fp32_allreduce_bytes_per_step"] / (workers - 1)
    assert (spsa["optimizer"], spsa["eps"], proj["eps"]) == ("spsa", SPSA_EPS, None)
    # K one-byte coefficients per bucket per rank, all-gathered
    assert proj["bytes_per_worker_per_step"] % (PROJECTION_DIRECTIONS * (workers - 1)) == 0
    assert 0 < proj["bytes_per_worker_per_step"] <= 8 * PROJECTION_DIRECTIONS * (workers - 1)
    for r in (spsa, proj):
        assert r["steps"] == steps and abs(r["initial_loss"] - LN_VOCAB) < 0.1
        assert all(math.isfinite(x) for x in r["loss_curve"])
        assert math.isfinite(r["eval_loss"]) and r["final_loss"] < r["initial_loss"]
        assert r["replicas_in_sync"]

"""``pycomm bench e2e --parallel fsdp|hsdp``: a tiny FSDP2 run with exact byte counts, the HSDP wiring, and the
options' errors."""

from __future__ import annotations

import json
import math
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from pycomm.bench.cli import main as cli_main
from pycomm.bench.config import MODELS, BenchConfig
from pycomm.bench.memory import MEMORY_KINDS
from pycomm.bench.methods import DEFAULT_METHODS, DEFAULT_METHODS_BY_PARALLEL, METHODS
from pycomm.bench.parallel import shard_units
from pycomm.bench.report import format_table

BUCKET = 512  # pycomm.fsdp.compress's default bucket_size, which the fsdp-quant rows use


def bench_main(args):
    return cli_main(["bench", "e2e", *args])


def _unit_shard_numels(model: torch.nn.Module, world: int) -> list[int]:
    """Per FSDP unit (each of :func:`shard_units`, then the root with the rest): the elements of one rank's
    shard, ``S = sum over its parameters of ceil(dim0 / W) * (numel / dim0)`` (FSDP2 pads dim 0 to W rows)."""
    def shard(params):
        return sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) for p in params)

    units = shard_units(model)
    inner = {id(p) for unit in units for p in unit.parameters()}
    return [shard(unit.parameters()) for unit in units] + [
        shard(p for p in model.parameters() if id(p) not in inner)]


def test_tiny_fsdp_run_counts_the_reduce_scatter_and_its_compression(tmp_path, capsys):
    """2 workers, FSDP2 uncompressed and at 4 bits: exact reduce-scatter and all-to-all bytes, same all-gathers.

    Per unit with shard S elements and W ranks, each rank sends per step: uncompressed reduce-scatter
    ``(W - 1) * S * 4``; quantized ``(W - 1) * (ceil(S / 512) * record_bytes(4, 512) + 1)`` (one all_to_all_single
    of the peers' quantized chunks plus a flag byte each). 4-bit records are 256 + 8 bytes per 512 elements, so
    the gradient part shrinks ~7.8x: checked against 6x.
    """
    from pycomm.ops import record_bytes

    world, out = 2, tmp_path / "fsdp.json"
    assert bench_main(["--parallel", "fsdp", "--workers", str(world), "--steps", "5", "--methods", "fsdp,fsdp-quant4",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FSDP2 (fully_shard per block or layer, and the root) over all 2 workers" in printed
    assert "speed vs fsdp" in printed and "peak mem/rank (MiB)" in printed
    report = json.loads(out.read_text())
    assert report["network"]["parallel"] == "fsdp" and report["config"]["parallel"] == "fsdp"
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["fsdp", "fsdp-quant4"]
    shards = _unit_shard_numels(MODELS["lm"].build(), world)
    assert len(shards) == 3  # two transformer blocks and the root
    for r in rows.values():
        assert r["status"] == "ok" and r["parallel"] == "fsdp" and r["replicas_in_sync"]
        assert all(math.isfinite(x) for x in r["loss_curve"]) and r["final_loss"] < r["initial_loss"]
        assert r["peak_memory_kind"] in MEMORY_KINDS and len(r["peak_memory_per_rank"]) == world
        assert r["peak_memory_bytes"] == max(r["peak_memory_per_rank"]) > 0
        counted = r["bytes_by_collective_per_worker_per_step"]
        assert sum(counted.values()) == r["bytes_per_worker_per_step"]
        assert r["bytes_by_mesh_dim_per_worker_per_step"] == {"shard": r["bytes_per_worker_per_step"]}
    plain = rows["fsdp"]["bytes_by_collective_per_worker_per_step"]
    quant = rows["fsdp-quant4"]["bytes_by_collective_per_worker_per_step"]
    assert plain["reduce_scatter_single"] == sum((world - 1) * s * 4 for s in shards)
    assert "all_to_all_single" not in plain
    assert quant["all_to_all_single"] == sum((world - 1) * (-(-s // BUCKET) * record_bytes(4, BUCKET) + 1)
                                             for s in shards)
    assert "reduce_scatter_single" not in quant  # no non-finite fallback
    assert quant["all_to_all_single"] <= plain["reduce_scatter_single"] / 6
    # the parameters' all-gathers (forward, and backward after resharding) do not change
    assert quant["all_gather_single"] == plain["all_gather_single"] > 0
    # same weights and first batch: the same first loss; 4 bits with error feedback stays close after
    assert rows["fsdp-quant4"]["initial_loss"] == rows["fsdp"]["initial_loss"]
    assert abs(rows["fsdp-quant4"]["final_loss"] - rows["fsdp"]["final_loss"]) < 0.05


class _TinyBlocks(torch.nn.Module):
    """One FSDP unit (a block in a ModuleList) and the root's head, like the benchmark models."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.blocks[0](x)))


def _hsdp_rows(rank, world):
    """Two steps of the ``hsdp`` row and of the ``hsdp-quant8`` row (real pycomm.hsdp), from the same seed."""
    from pycomm.bench.parallel import build_mesh

    cfg = BenchConfig(workers=world, parallel="hsdp", replicas=2, steps=2)
    finals, states = [], []
    for name in ("hsdp", "hsdp-quant8"):
        torch.manual_seed(0)
        model = _TinyBlocks()
        states.append(METHODS[name].attach(model, build_mesh(cfg, world, torch.device("cpu")), cfg))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            loss = model(torch.randn(4, 8, generator=g)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        finals.append([p.full_tensor() for p in model.parameters()])
    state = states[1]
    wiring = {"bits": state.bits, "error_feedback": state.error_feedback,
              "group": dist.get_process_group_ranks(state.replicate_group),
              "mesh": next(model.parameters()).device_mesh.mesh.tolist(),  # what FSDP shards over
              "calls": {name: hook.calls for name, hook in state.hooks.items()}}
    return finals, wiring


def test_hsdp_quant_rows_shard_inside_a_replica_and_compress_across_replicas():
    """4 ranks as 2 x 2: the compressed rows shard on the mesh's shard dimension and give the replicate group
    (ranks {r, r + 2}) to pycomm.hsdp.compress_replicas, whose hooks run every backward; they train like
    PyTorch's HSDP within 8-bit quantization, and every rank ends with the same parameters."""
    results = run_distributed(_hsdp_rows, 4)
    for rank, (finals, wiring) in enumerate(results):
        assert wiring == {"bits": 8, "error_feedback": True, "group": [rank % 2, rank % 2 + 2],
                          "mesh": [rank // 2 * 2, rank // 2 * 2 + 1],  # this replica's shard group only
                          "calls": {"": 2, "blocks.0": 2}}
        native, wired = finals
        # Two SGD steps (lr 0.1) on gradients of about 0.1: 8-bit rounding moves a weight by well under
        # 1e-3 (measured: 5e-5); without the replica average the weights end 1.0e-2 off (measured).
        for a, b in zip(native, wired):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
        for a, b in zip(wired, results[0][0][1]):
            assert torch.equal(a, b)  # the replicas agree bit for bit


def test_parallel_options_choose_methods_and_refuse_mixtures(monkeypatch, capsys):
    """Defaults follow --parallel; a method of the other kind, an HSDP world that does not divide, and
    --replicas outside HSDP are refused with a message that says why."""
    runs = []
    monkeypatch.setattr("pycomm.bench.cli.run_e2e", lambda methods, config, **kw: runs.append((methods, config)))
    assert bench_main(["--parallel", "fsdp", "--workers", "2"]) == 0
    assert bench_main(["--parallel", "hsdp"]) == 0
    assert bench_main([]) == 0
    assert [m for m, _ in runs] == [["fsdp", "fsdp-quant8", "fsdp-quant4", "fsdp-quant2"],
                                   ["hsdp", "hsdp-quant8", "hsdp-quant4", "hsdp-quant2"], list(DEFAULT_METHODS)]
    assert [(c.parallel, c.hsdp_replicas if c.parallel == "hsdp" else None) for _, c in runs] == [
        ("fsdp", None), ("hsdp", 2), ("ddp", None)]
    assert DEFAULT_METHODS_BY_PARALLEL["ddp"] == DEFAULT_METHODS
    capsys.readouterr()
    refused = ((["--parallel", "fsdp", "--methods", "quant4"], "quant4 (ddp) cannot run with --parallel fsdp"),
               (["--methods", "allreduce,fsdp"], "fsdp (fsdp) cannot run with --parallel ddp"),
               (["--parallel", "hsdp", "--workers", "6", "--replicas", "4"], "divide into replicas x shards"),
               (["--parallel", "hsdp", "--workers", "2"], "divide into replicas x shards"),
               (["--parallel", "fsdp", "--replicas", "2"], "replicas is for parallel='hsdp'"),
               (["--parallel", "fsdp", "--hierarchy", "node"], "hierarchy is an option of the DDP hooks"))
    for args, message in refused:
        assert bench_main(args) == 2, args
        assert message in capsys.readouterr().err, args
    assert len(runs) == 3


def test_failed_and_unavailable_rows_keep_the_columns():
    """The peak memory column is the last of every row, failed ones included (same number of cells)."""
    ok = {"method": "fsdp", "status": "ok", "optimizer": "adamw", "lr": 3e-3, "final_loss": 3.0, "eval_loss": 3.0,
          "eval_accuracy": 0.3, "step_time_s": 0.2, "bytes_per_worker_per_step": 10.0, "compression_ratio": 1.0,
          "peak_memory_bytes": 300 * 2**20, "peak_memory_kind": "rss", "parallel": "fsdp"}
    failed = {"method": "hsdp-quant4", "status": "unavailable", "reason": "no pycomm.hsdp", "optimizer": "adamw",
              "parallel": "hsdp"}
    rows = [line for line in format_table([ok, failed]).splitlines() if line.startswith("| ")]
    assert len({line.count("|") for line in rows}) == 1
    assert rows[1].endswith("| 300 |") and "speed vs fsdp" in rows[0]


def test_peak_memory_is_reset_per_method():
    """The CPU peak (VmHWM) sees a 64 MiB tensor, and the next method's reset forgets it."""
    from pycomm.bench.memory import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    if memory.kind != "rss":
        pytest.skip(f"no resettable VmHWM here (kind {memory.kind})")
    size = 64 * 2**20
    block = torch.ones(size // 4)  # written, so resident
    first = memory.peak_bytes()
    assert first >= memory.start_bytes + 0.9 * size
    del block
    memory.reset()
    assert memory.peak_bytes() < first - size / 2

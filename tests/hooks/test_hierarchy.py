"""Hierarchical compression (issue 15): ``hierarchy="node"`` reduces inside a node in full precision,
compresses only among the ranks that hold the same shard on the other nodes, and all-gathers inside
the node. Two nodes of two ranks are emulated on one machine with torchrun's variables
(``GROUP_RANK``, ``LOCAL_WORLD_SIZE``, ``LOCAL_RANK``) set per Gloo process."""

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import pycomm
from dist_utils import run_distributed
import resume_task
from resume_task import SmallNet, batch


def _as_nodes(rank: int, per_node: int) -> None:
    os.environ.update(LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK=str(rank // per_node),
                      LOCAL_RANK=str(rank % per_node))


def _one_step(rank: int, world: int, per_node: int, method: str, options: dict) -> dict:
    """One backward at step 0 (start_iter 0) in node and in flat mode, and the float64 average of
    every rank's local gradient."""
    _as_nodes(rank, per_node)
    out = {}
    for mode in ("node", "flat"):
        torch.manual_seed(0)
        ddp = DDP(SmallNet())
        state = pycomm.register(ddp, method, hierarchy=mode, **options)
        x, y = batch(rank, 0)
        F.cross_entropy(ddp(x), y).backward()
        out[mode] = torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters()])
        out[mode + "_resolved"] = state.state_dict()["hierarchy"]
    torch.manual_seed(0)
    local = SmallNet()
    F.cross_entropy(local(x), y).backward()
    mine = torch.cat([p.grad.reshape(-1) for p in local.parameters()]).double()
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    out["reference"] = torch.stack(everyone).mean(0)
    return out


def _error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference).norm() / reference.norm())


def test_quant4_node_step_is_the_average_within_quantization_error():
    """2 nodes x 2 ranks, one quant4 step. Tolerance: the relative L2 error against the float64 average
    of the 4 local gradients stays below 0.2 in both modes (measured 0.14 in both: 4-bit buckets of 512
    elements have 15 levels, so each element carries up to 1/15 of its bucket's range from each of the
    two quantizations). Node mode quantizes the node averages (2 contributions, each quantized once,
    instead of 4 in flat mode) and re-quantizes their sum once, as flat mode does, so its error is not
    larger than flat's by more than 1.25x; ranks end bit-identical in both modes."""
    results = run_distributed(_one_step, 4, 2, "quant", {"bits": 4, "start_iter": 0, "min_numel": 256})
    for r in results:
        assert r["node_resolved"] == {"mode": "node", "nodes": 2, "ranks_per_node": 2}
        assert r["flat_resolved"] == {"mode": "flat"}
        assert torch.equal(r["node"], results[0]["node"]) and torch.equal(r["flat"], results[0]["flat"])
    reference = results[0]["reference"]
    node, flat = _error(results[0]["node"], reference), _error(results[0]["flat"], reference)
    assert 0 < node < 0.2 and 0 < flat < 0.2, (node, flat)
    assert node <= 1.25 * flat, (node, flat)


def _train_each(rank: int, world: int, per_node: int, runs: list, steps: int, count: bool, cap: float = 25.0) -> list:
    """:func:`_train` for each ``(method, options)`` of ``runs``, in one process."""
    return [_train(rank, world, per_node, method, options, steps, count, cap) for method, options in runs]


def _train(rank: int, world: int, per_node: int, method: str, options: dict, steps: int, count: bool,
           cap: float = 25.0) -> dict:
    from pycomm.traffic import CollectiveByteCounter

    _as_nodes(rank, per_node)
    torch.manual_seed(0)
    ddp = DDP(SmallNet(), bucket_cap_mb=cap)
    state = pycomm.register(ddp, method, **options)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    counter = CollectiveByteCounter()
    by_group = []
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        counter.reset()
        with counter if count else _nothing():
            F.cross_entropy(ddp(x), y).backward()
        by_group.append(dict(counter.bytes_by_group))
        opt.step()
    groups = getattr(state, "_node_groups", None)
    return {"params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()}, "bytes": by_group,
            "inter": None if groups is None else tuple(dist.get_process_group_ranks(groups.inter)),
            "iter": state.iter, "choice": getattr(state, "choice", None)}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _identical(results: list) -> bool:
    return all(torch.equal(r["params"][n], results[0]["params"][n]) for r in results for n in r["params"])


def test_quant4_node_mode_ranks_identical_and_inter_node_bytes():
    """Bytes that cross nodes, per node per step (CollectiveByteCounter, pairwise exchange): flat quant
    sends each of its W-1 peers the same share, and W-M of them are on the other node, so a node sends
    ``flat_cross = sum over its M ranks of (W-M)/(W-1) * bytes on the world group`` (2/3 at 2x2). Node
    mode crosses nodes only in the inter-node groups: ``node_cross = sum over its M ranks of the bytes on
    their inter-node group``, one compressed copy of the bucket shared among the M local ranks (by
    shards of whole parameters, so one rank may carry most of it; the node's sum does not depend on
    the cut). Expected ratio about 1/M = 0.5 plus padding; required at most 0.6."""
    options = {"bits": 4, "min_numel": 256}
    both = run_distributed(_train_each, 4, 2, [("quant", {**options, "hierarchy": h}) for h in ("node", "flat")], 5,
                           True)
    node, flat = [r[0] for r in both], [r[1] for r in both]
    assert _identical(node) and _identical(flat)
    assert [r["iter"] for r in node] == [5] * 4
    world, per_node = 4, 2
    for step in (3, 4):  # compressed steps (start_iter 2), after DDP's rebuild
        for ranks in ((0, 1), (2, 3)):
            for rank in ranks:
                assert node[rank]["inter"] == (rank % 2, rank % 2 + 2)
            node_cross = sum(node[rank]["bytes"][step].get(node[rank]["inter"], 0) for rank in ranks)
            flat_cross = sum((world - per_node) / (world - 1) * flat[rank]["bytes"][step][tuple(range(world))]
                             for rank in ranks)
            assert 0 < node_cross <= 0.6 * flat_cross, (step, ranks, node_cross, flat_cross)
    # Parameters stay close to flat quant's after 5 steps (different quantization noise, same average).
    diff = max(float((node[0]["params"][n] - flat[0]["params"][n]).abs().max()) for n in flat[0]["params"])
    assert diff < 0.01, diff


def test_node_mode_with_one_rank_per_node_is_flat():
    """hierarchy='node' with one rank per node (2 nodes x 1 rank) is exactly the flat algorithm."""
    options = {"bits": 4, "min_numel": 256}
    both = run_distributed(_train_each, 2, 1, [("quant", {**options, "hierarchy": h}) for h in ("node", "flat")], 4,
                           False)
    node, flat = [r[0] for r in both], [r[1] for r in both]
    assert all(torch.equal(node[0]["params"][n], flat[0]["params"][n]) for n in flat[0]["params"])
    assert node[0]["inter"] is None


SCENARIOS = {  # per rank: (GROUP_RANK, LOCAL_WORLD_SIZE)
    "2x2": [(0, 2), (0, 2), (1, 2), (1, 2)],
    "one node": [(0, 4)] * 4,
    "uneven": [(0, 3), (0, 3), (0, 3), (1, 1)],
}


def _resolve_all(rank: int, world: int, cases: list) -> list:
    out = []
    for scenario, setting in cases:
        group_rank, local_world = SCENARIOS[scenario][rank]
        os.environ.update(LOCAL_WORLD_SIZE=str(local_world), GROUP_RANK=str(group_rank))
        try:
            mine = setting[rank] if isinstance(setting, list) else setting
            state = pycomm.register(DDP(torch.nn.Linear(4, 4)), "quant", hierarchy=mine)
            out.append(state.state_dict()["hierarchy"]["mode"])
        except ValueError as e:
            out.append(f"error: {e}")
    return out


def test_auto_picks_node_only_across_nodes_and_bad_settings_raise():
    cases = [("2x2", "auto"), ("one node", "auto"), ("uneven", "auto"), ("uneven", "node"), ("one node", "node"),
             ("2x2", ["flat", "node", "node", "node"])]
    results = run_distributed(_resolve_all, 4, cases)
    assert all(r == results[0] for r in results)  # the same outcome, and the same message, on every rank
    assert results[0][:3] == ["node", "flat", "flat"]
    assert results[0][3].startswith("error: hierarchy='node' needs every node to have the same number")
    assert "[0, 1, 2], [3]" in results[0][3]
    assert results[0][4] == "node"  # explicit node on one node: the node acts as one worker
    assert results[0][5] == ("error: pycomm: the ranks disagree on hierarchy (rank 0: 'flat', rank 1: 'node', "
                             "rank 2: 'node', rank 3: 'node'); every rank must pass the same hierarchy")
    with pytest.raises(ValueError, match="hierarchy must be one of 'auto', 'flat', 'node', got 'nodes'"):
        pycomm.hooks.QuantState(hierarchy="nodes")
    with pytest.raises(ValueError, match="hierarchy must be one of 'auto', 'flat', 'node', got None"):
        pycomm.register(DDP.__new__(DDP), "dgc", hierarchy=None)


def test_dgc_node_mode_is_one_worker_per_node():
    """DGC in node mode: each node is one worker on each shard (momentum correction and top-k on the
    node's average gradient). At density 1 without momentum masking DGC is SGD with momentum on the
    average, and momentum is linear, so node mode equals flat mode up to float rounding (tolerance
    1e-6 relative to the largest parameter after 4 steps: the sums run in another order). At density
    0.05 the ranks end bit-identical and the node's ranks send less across nodes than flat DGC (one
    top-k payload per shard among N = 2 ranks instead of one per rank among W = 4)."""
    dense = {"density": 1.0, "momentum": 0.9, "momentum_masking": False, "min_numel": 256}
    sparse = {"density": 0.05, "momentum": 0.9, "min_numel": 256}
    runs = [("dgc", {**dense, "hierarchy": "node"}), ("dgc", {**dense, "hierarchy": "flat"}),
            ("dgc", {**sparse, "hierarchy": "node"}), ("dgc", {**sparse, "hierarchy": "flat"})]
    results = run_distributed(_train_each, 4, 2, runs, 4, True)
    for i in range(len(runs)):
        assert _identical([r[i] for r in results]), runs[i]
    node, flat = results[0][0]["params"], results[0][1]["params"]
    for name in flat:
        scale = max(float(flat[name].abs().max()), 1.0)
        assert torch.allclose(node[name], flat[name], rtol=0, atol=1e-6 * scale), name
    for ranks in ((0, 1), (2, 3)):
        node_cross = sum(results[r][2]["bytes"][3].get(results[r][2]["inter"], 0) for r in ranks)
        flat_cross = sum(2 / 3 * results[r][3]["bytes"][3][(0, 1, 2, 3)] for r in ranks)
        assert 0 < node_cross <= 0.6 * flat_cross, (node_cross, flat_cross)


def test_projection_and_lgreco_node_mode():
    """spsa-projection and L-GreCo (quant family) in node mode: ranks bit-identical; L-GreCo's solve
    (after step 3) sees every compressed layer, gathered from both local ranks' shards, and every rank
    applies the same choice."""
    runs = [("spsa-projection", {"num_directions": 8, "error_feedback": True, "hierarchy": "node"}),
            ("lgreco", {"family": "quant", "default": 4, "start_iter": 4, "period": 20, "acc_steps": 3,
                        "min_numel": 256, "hierarchy": "node"})]
    results = run_distributed(_train_each, 4, 2, runs, 6, False)
    for i in range(len(runs)):
        assert _identical([r[i] for r in results]), runs[i]
        assert all(r[i]["inter"] == (rank % 2, rank % 2 + 2) for rank, r in enumerate(results))
    choices = [r[1]["choice"] for r in results]
    assert choices[0] and all(c == choices[0] for c in choices)
    assert sorted(choices[0]) == ["conv2.weight", "fc1.weight", "fc2.weight"]


def _check_element_shards(saved: list, *fields: str) -> None:
    """Each rank's state dict of a 2x2 node-mode run holds, per parameter its shard cuts, a tensor
    shaped like the parameter that is zero outside its piece: the local ranks of a node cover every
    parameter, hold disjoint element ranges (one parameter is cut between them: SmallNet's one bucket
    is split by elements), and the same local rank holds the same parameters on both nodes."""
    owned = [set(sd["params"]) for sd in saved]
    assert owned[0] == owned[2] and owned[1] == owned[3]  # shards by local rank
    assert owned[0] | owned[1] == {n for n, _ in SmallNet().named_parameters()}
    cut = owned[0] & owned[1]
    assert len(cut) == 1, cut  # one parameter holds the cut between the two halves of the bucket
    for node in ((0, 1), (2, 3)):
        for name in cut:
            for field in fields:
                held = [saved[r]["params"][name][field] != 0 for r in node]
                assert held[0].any() and held[1].any() and not (held[0] & held[1]).any(), (name, field)


def _resume_on_nodes(rank: int, world: int, per_node: int, *args) -> dict:
    _as_nodes(rank, per_node)
    out = resume_task.run(rank, world, *args)
    out["saved_state"] = None
    return out


def test_node_mode_resumes_exactly():
    """Checkpoint at step 10 and resume in fresh processes, 2 nodes x 2 ranks, DGC in node mode (density 1,
    DGC's momentum 0.9 without masking, so u carries every step's state). Each rank's state dict holds u
    and v of the parameters its shard cuts, zero outside its piece (:func:`_check_element_shards`). The
    resumed DDP starts from its first bucket layout (model order; the uninterrupted run is at its
    rebuilt, reversed layout), so fc1.weight is cut elsewhere and the ranks of each node hand the state
    over to the new pieces. Intra-node sums of 2 (one non-zero term per element) and inter-node sums
    of 2 are exact in float, so the resumed run is bit-identical to the uninterrupted one.

    (Sparse DGC resumes close but not bit for bit: its top-k counts are per piece, and the first
    resumed step runs under the other cut.)"""
    method = "dgc"
    options = {"density": 1.0, "momentum": 0.9, "momentum_masking": False, "min_numel": 256, "hierarchy": "node"}
    full = run_distributed(_resume_on_nodes, 4, 2, method, options, 25.0, 0.0, None, None)
    saved = torch.load(io.BytesIO(full[0]["checkpoint"]), weights_only=True)["pycomm"]
    _check_element_shards(saved, "u")
    resumed = run_distributed(_resume_on_nodes, 4, 2, method, options, 25.0, 0.0, full[0]["checkpoint"], None)
    assert _identical(full) and _identical(resumed)
    assert all(torch.equal(full[0]["params"][n], resumed[0]["params"][n]) for n in full[0]["params"])
    assert resumed[0]["norms_end"] == full[0]["norms_end"]


class _OneBig(torch.nn.Module):
    """One parameter of 131072 elements: DDP puts it in a bucket of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(256, 512) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _train_one_big(rank: int, world: int, per_node: int, runs: list, steps: int) -> list:
    """``steps`` SGD steps of :class:`_OneBig` per ``(method, options)``: the parameter, the bytes per
    group of the last step, and the layers of this rank's plan of the bucket."""
    from pycomm.traffic import CollectiveByteCounter

    _as_nodes(rank, per_node)
    out = []
    for method, options in runs:
        torch.manual_seed(0)
        ddp = DDP(_OneBig())
        state = pycomm.register(ddp, method, **options)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        counter = CollectiveByteCounter()
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, target = torch.randn(8, 256, generator=g), torch.randn(8, 512, generator=g)
            opt.zero_grad()
            counter.reset()
            with counter:
                F.mse_loss(ddp(x), target).backward()
            opt.step()
        plan = getattr(state, "inner", state)._plans.get(0)
        out.append({"weight": ddp.module.weight.detach().clone(), "bytes": dict(counter.bytes_by_group),
                    "layers": None if plan is None else list(plan.layers)})
    return out


def test_one_big_parameter_is_split_evenly_across_the_node():
    """A bucket that holds one big parameter (the "large" benchmark model's case) is cut by elements:
    each local rank owns half of it (its plan holds the piece (name, 0, 65536, 65536 * local rank)),
    and the intra-node reduce-scatter and all-gather each move (M-1)/M of the bucket per rank:
    ``(M-1)/M * b`` counted for the reduce-scatter of the b-byte bucket plus ``(M-1) * b/M`` for the
    all-gather of the own half, 1 x the bucket per rank and step in all at M = 2 (whole-parameter
    shards gave the bucket to one rank and moved 2 x the bucket). Both local ranks send the same
    bytes between nodes (each compresses its half). Node mode stays within each method's tolerance
    of flat mode: quant4 parameters within 0.01 after 3 steps (as in the SmallNet test), DGC at
    density 1 without masking within 1e-6 relative (momentum is linear; sums in another order)."""
    dense = {"density": 1.0, "momentum": 0.9, "momentum_masking": False, "min_numel": 256}
    runs = [("quant", {"bits": 4, "start_iter": 0, "min_numel": 256, "hierarchy": "node"}),
            ("quant", {"bits": 4, "start_iter": 0, "min_numel": 256, "hierarchy": "flat"}),
            ("dgc", {**dense, "hierarchy": "node"}), ("dgc", {**dense, "hierarchy": "flat"})]
    results = run_distributed(_train_one_big, 4, 2, runs, 3)
    bucket_bytes, per_node = 256 * 512 * 4, 2
    for i in range(len(runs)):
        assert all(torch.equal(r[i]["weight"], results[0][i]["weight"]) for r in results), runs[i]
    for i in (0, 2):  # node mode
        for rank, r in enumerate(results):
            local, intra, inter = rank % 2, (rank - rank % 2, rank - rank % 2 + 1), (rank % 2, rank % 2 + 2)
            assert r[i]["layers"] == [("weight", 0, 65536, 65536 * local)], r[i]["layers"]
            assert r[i]["bytes"][intra] == 2 * (per_node - 1) * bucket_bytes // per_node, r[i]["bytes"]
            assert 0 < r[i]["bytes"][inter] == results[rank - local][i]["bytes"][(0, 2)]
    quant_diff = float((results[0][0]["weight"] - results[0][1]["weight"]).abs().max())
    assert 0 < quant_diff < 0.01, quant_diff
    flat = results[0][3]["weight"]
    assert torch.allclose(results[0][2]["weight"], flat, rtol=0, atol=1e-6 * max(float(flat.abs().max()), 1.0))


def _overflow(rank: int, world: int, runs: list) -> list:
    """One step per run in node mode with a NaN in one element of rank 3's local fc1.weight gradient."""
    _as_nodes(rank, 2)
    out = []
    for method, options in runs:
        torch.manual_seed(0)
        ddp = DDP(SmallNet())
        pycomm.register(ddp, method, hierarchy="node", **options)
        if rank == 3:
            ddp.module.fc1.weight.register_hook(lambda g: g.index_put((torch.tensor([0]), torch.tensor([0])),
                                                                      torch.tensor(float("nan"))))
        x, y = batch(rank, 0)
        F.cross_entropy(ddp(x), y).backward()
        out.append({n: bool(torch.isfinite(p.grad).all()) for n, p in ddp.module.named_parameters()})
    return out


def test_overflow_on_one_rank_reaches_every_rank():
    """A NaN in one rank's gradient reaches every rank through the full-precision intra-node sum, the
    method's own overflow path on the owning shard among the inter-node group (CPU: an uncompressed
    all-reduce of that shard), and the intra-node all-gather, so GradScaler skips the step everywhere;
    the other parameters stay finite."""
    runs = [("quant", {"bits": 4, "start_iter": 0, "min_numel": 256}), ("dgc", {"density": 0.05, "min_numel": 256})]
    results = run_distributed(_overflow, 4, runs)
    for finite in (f for r in results for f in r):
        assert finite == {n: n != "fc1.weight" for n in finite}, finite


def _resolved_mismatch() -> str:
    from pycomm.hooks import QuantState, hierarchy

    state = QuantState(bits=4).bind(SmallNet())
    hierarchy.settle(state)  # no process group: one node, flat
    saved = {**state.state_dict(), "hierarchy": {"mode": "node", "nodes": 2, "ranks_per_node": 2}}
    with pytest.raises(ValueError, match="made with hierarchy .*'node'.* this state runs .*'flat'"):
        state.load_state_dict(saved)
    state.load_state_dict(saved, strict=False)  # skipped, logged
    return "ok"


def test_checkpoint_of_another_hierarchy_is_refused():
    """Per-parameter state of node mode is the shard's; a flat run refuses it (strict) rather than
    silently resuming with parts of every rank's state."""
    assert _resolved_mismatch() == "ok"


def test_buckets_with_fewer_parameters_than_ranks_per_node():
    """With small buckets (bucket_cap_mb=0.05) some buckets hold one parameter, so one local rank's
    shard is empty: it sends nothing between nodes but still counts the step (the next steps agree).
    DGC at density 1 still equals flat mode up to rounding; every method keeps ranks bit-identical."""
    dense = {"density": 1.0, "momentum": 0.9, "momentum_masking": False, "min_numel": 256}
    runs = [("dgc", {**dense, "hierarchy": "node"}), ("dgc", {**dense, "hierarchy": "flat"}),
            ("quant", {"bits": 4, "min_numel": 256, "hierarchy": "node"}),
            ("spsa-projection", {"num_directions": 8, "error_feedback": True, "hierarchy": "node"})]
    results = run_distributed(_train_each, 4, 2, runs, 4, False, 0.05)
    for i in range(len(runs)):
        assert _identical([r[i] for r in results]), runs[i]
        assert all(r[i]["iter"] == 4 for r in results)
    node, flat = results[0][0]["params"], results[0][1]["params"]
    for name in flat:
        assert torch.allclose(node[name], flat[name], rtol=0, atol=1e-6 * max(float(flat[name].abs().max()), 1.0))


def test_quant_node_mode_resume_carries_the_residuals():
    """quant4 in node mode cannot resume bit for bit (as in flat mode, see test_resume.py: the first
    resumed step runs under DDP's first layout, so other ranks own other chunks and draw elsewhere).
    The residuals of each shard still reach their new owner: what the quantization owes after the
    first resumed step is the uninterrupted run's within 2x, and the resumed run ends closer to the
    uninterrupted one than a resume without the hook state."""
    method, options, momentum = "quant", {"bits": 4, "hierarchy": "node"}, 0.9
    full = run_distributed(_resume_on_nodes, 4, 2, method, options, 25.0, momentum, None, None)
    resumed = run_distributed(_resume_on_nodes, 4, 2, method, options, 25.0, momentum, full[0]["checkpoint"], None)
    dropped = run_distributed(_resume_on_nodes, 4, 2, method, options, 25.0, momentum, full[0]["checkpoint"], None,
                              False, True)
    assert _identical(resumed)
    for rank in range(4):  # each rank's own shard: local ranks 0 and 1 hold different parameters
        owed_full, owed_resumed = full[rank]["norms_after_first"]["owed"], resumed[rank]["norms_after_first"]["owed"]
        assert 0.5 * owed_full < owed_resumed < 2.0 * owed_full, (rank, owed_full, owed_resumed)

    def diff(a, b):
        return max(float((a[0]["params"][n] - b[0]["params"][n]).abs().max()) for n in a[0]["params"])

    assert diff(full, resumed) < diff(full, dropped)

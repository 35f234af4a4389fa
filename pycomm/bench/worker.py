"""One DDP worker process of the benchmark: train each method in turn and measure it.

Started either by the launcher (:func:`worker_main`, forked or spawned, rank and world given) or, on emulated
nodes, by ``torchrun`` as ``python -m pycomm.bench.worker --spec SPEC`` (:func:`main`: rank, world and local rank
from torchrun's environment, the process group from ``env://``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import socket
import statistics
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pycomm.bench.config import BenchConfig
from pycomm.bench.data import Corpus, eval_batches, load_corpus, train_batch, train_generator
from pycomm.bench.memory import PeakMemory
from pycomm.bench.methods import MethodSpec
from pycomm.bench.netns import read_tx_bytes
from pycomm.bench.node_network import NODE_INTERFACE
from pycomm.traffic import CollectiveByteCounter

__all__ = ["fp32_allreduce_bytes"]

logger = logging.getLogger(__name__)


def fp32_allreduce_bytes(model: torch.nn.Module, workers: int) -> int:
    """Bytes one worker sends per step in an fp32 ring all-reduce of all gradients (``2(W-1)/W`` of them)."""
    return sum(2 * (workers - 1) * p.numel() * 4 // workers for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- worker side


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the workers' rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _param_checksum(model: torch.nn.Module) -> float:
    """A checksum of the parameters; of the full ones where they are sharded (DTensors: all-gathered over the
    shard group, so under HSDP each replica's own parameters, and a collective)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        params = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
        return float(sum(p.double().abs().sum() + p.double().sum() for p in params))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _train_one(name: str, spec: MethodSpec, cfg: BenchConfig, corpus: Corpus,
               eval_set: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world: int,
               device: torch.device, progress: Optional[Callable[[int, float], None]],
               tx_interfaces: Sequence[str] = (), node: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Train one method on this rank; return the merged result on rank 0 (None elsewhere).

    ``tx_interfaces``: the interfaces whose tx byte counters this rank reads before the loop and after every
    step (one rank per network namespace reads them: rank 0 reads ``lo`` of the shared namespace, local rank 0
    of each emulated node reads its ``lo`` and :data:`NODE_INTERFACE`). ``node``: the emulated node this rank
    runs on (None on one machine).
    """
    if spec.parallel != cfg.parallel:
        raise ValueError(f"method {name} is a {spec.parallel} method but the run is parallel={cfg.parallel!r}")
    sharded = spec.parallel != "ddp"
    memory = PeakMemory(device)
    memory.reset()
    torch.manual_seed(cfg.seed)
    model = cfg.model_spec.build().to(device)
    fp32_bytes = fp32_allreduce_bytes(model, world)
    mesh_groups: dict[tuple[int, ...], str] = {}
    if spec.zeroth_order:
        ddp, state = None, None
        optimizer = spec.make_optimizer(model, cfg)
        optimizer.sync(src=0)  # same weights everywhere (they already are: same seed), outside the counter
    elif sharded:
        from pycomm.bench.parallel import build_mesh

        mesh = build_mesh(cfg, world, device)
        for dim, dim_name in enumerate(mesh.mesh_dim_names or ("shard",)):
            mesh_groups[tuple(dist.get_process_group_ranks(mesh.get_group(dim)))] = dim_name
        state = spec.attach(model, mesh, cfg)  # fully_shard, then the method's compression
        ddp = model  # the FSDP module runs the forward itself
        optimizer = spec.make_optimizer(model.parameters(), cfg)
    else:
        ddp = DDP(model, bucket_cap_mb=spec.ddp_bucket_cap_mb(cfg, model))
        state = spec.attach(ddp, cfg)
        optimizer = spec.make_optimizer(model.parameters(), cfg)
    clip = cfg.grad_clip if cfg.grad_clip > 0 and not spec.clip_in_hook else 0.0
    generator = train_generator(cfg.seed, rank)
    counter = CollectiveByteCounter()

    losses: list[float] = []
    step_bytes: list[int] = []
    step_calls: list[int] = []
    step_by_collective: list[dict[str, int]] = []
    step_by_dim: list[dict[str, int]] = []
    step_times: list[float] = []
    dist.barrier()
    tx_marks = [_read_tx(tx_interfaces)] if tx_interfaces else []
    wall_start = time.perf_counter()
    for step in range(cfg.steps):
        inputs, targets = train_batch(corpus, cfg.batch, cfg.model_spec.context, generator)
        inputs, targets = inputs.to(device), targets.to(device)
        if spec.zeroth_order:
            optimizer.lr = spec.lr_at(cfg, step)
            start = time.perf_counter()
            counter.reset()
            with counter:  # two perturbed forwards (no_grad) and one all_gather of one byte
                loss_value = optimizer.step(functools.partial(model.loss, inputs, targets))
        elif sharded:
            for group in optimizer.param_groups:
                group["lr"] = spec.lr_at(cfg, step)
            start = time.perf_counter()
            counter.reset()
            with counter:  # FSDP all-gathers the parameters in the forward too
                loss = model.loss_from_logits(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            loss_value = float(loss.detach())
        else:
            for group in optimizer.param_groups:
                group["lr"] = spec.lr_at(cfg, step)
            start = time.perf_counter()
            loss = model.loss_from_logits(ddp(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            counter.reset()
            with counter:
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            loss_value = float(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        step_bytes.append(counter.bytes_sent)
        step_calls.append(sum(counter.calls.values()))
        step_by_collective.append(dict(counter.bytes_by_collective))
        if sharded:
            by_dim: dict[str, int] = {}
            for ranks, sent in counter.bytes_by_group.items():
                label = mesh_groups.get(ranks, "world" if len(ranks) == world else "other")
                by_dim[label] = by_dim.get(label, 0) + sent
            step_by_dim.append(by_dim)
        losses.append(loss_value)
        if tx_marks:  # after the step's last collective: its traffic (nearly all ranks' of it) has crossed lo
            tx_marks.append(_read_tx(tx_interfaces))
        if progress is not None:
            progress(step + 1, sum(step_times))
        if not math.isfinite(loss_value):
            logger.warning("%s: rank %d loss is %s at step %d", name, rank, loss_value, step)
    dist.barrier()
    wall = time.perf_counter() - wall_start
    peak_memory = memory.peak_bytes()
    tx = {"interfaces": list(tx_interfaces), "marks": tx_marks, "end": _read_tx(tx_interfaces) if tx_marks else None}

    model.eval()
    eval_sum, eval_count, eval_hits, eval_predictions = 0.0, 0, 0, 0
    own_batches = eval_set[rank::world]
    # a sharded forward is a collective: every rank runs as many as the rank with the most batches
    rounds = -(-len(eval_set) // world) if sharded else len(own_batches)
    with torch.no_grad():
        for index in range(rounds):
            if index >= len(own_batches):
                model(eval_set[0][0].to(device))  # joins the other ranks' all-gathers, not scored
                continue
            inputs, targets = own_batches[index]
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            hits, predictions = model.correct(logits, targets)
            eval_sum += float(model.loss_from_logits(logits, targets)) * predictions
            eval_count += predictions
            eval_hits += hits
            eval_predictions += predictions

    local = {"losses": losses, "bytes": step_bytes, "calls": step_calls, "times": step_times, "wall": wall,
             "eval_sum": eval_sum, "eval_count": eval_count, "eval_hits": eval_hits,
             "checksum": _param_checksum(model), "tx": tx, "node": node, "by_collective": step_by_collective,
             "by_dim": step_by_dim, "peak_memory": peak_memory, "start_memory": memory.start_bytes,
             "memory_kind": memory.kind}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    del ddp, state, optimizer
    if rank != 0:
        return None

    steps = cfg.steps
    mean_loss = [sum(g["losses"][s] for g in gathered) / world for s in range(steps)]
    rank_mean_bytes = [sum(g["bytes"][s] for g in gathered) / world for s in range(steps)]
    bytes_per_step = statistics.median(rank_mean_bytes)
    mean_bytes_per_step = sum(rank_mean_bytes) / steps
    # a step ends for everyone at the same collective, so the slowest rank sets its time
    step_s = [max(g["times"][s] for g in gathered) for s in range(steps)]
    checksums = [g["checksum"] for g in gathered]
    eval_count_total = sum(g["eval_count"] for g in gathered)
    wire_median, wire_mean, inter_node, inter_node_mean = _wire_bytes([g["tx"] for g in gathered], world, steps)
    window = mean_loss[-cfg.window:]
    start_memory = [g["start_memory"] for g in gathered]
    return {
        "method": name,
        "description": spec.description,
        "status": "ok",
        "reason": None,
        "optimizer": spec.optimizer,
        "lr": spec.base_lr(cfg),
        "eps": spec.eps if spec.zeroth_order else None,
        "workers": world,
        "steps": steps,
        "step_time_s": statistics.median(step_s),
        "bytes_per_worker_per_step": bytes_per_step,
        "mean_bytes_per_worker_per_step": mean_bytes_per_step,
        "wire_bytes_per_worker_per_step": wire_median,
        "mean_wire_bytes_per_worker_per_step": wire_mean,
        "inter_node_bytes_per_node_per_step": inter_node,
        "mean_inter_node_bytes_per_node_per_step": inter_node_mean,
        "rank_nodes": [g["node"] for g in gathered] if node is not None else None,
        "param_checksums": checksums,
        "fp32_allreduce_bytes_per_step": fp32_bytes,
        "compression_ratio": fp32_bytes / bytes_per_step if bytes_per_step > 0 else None,  # None: sent nothing
        "initial_loss": mean_loss[0],
        "final_loss": sum(window) / len(window),
        "eval_loss": sum(g["eval_sum"] for g in gathered) / max(1, eval_count_total),
        "eval_accuracy": sum(g["eval_hits"] for g in gathered) / max(1, eval_count_total),
        "collective_calls_per_step": sum(sum(g["calls"]) for g in gathered) / (world * steps),
        "bytes_by_collective_per_worker_per_step": _median_of_rank_means([g["by_collective"] for g in gathered]),
        "bytes_by_mesh_dim_per_worker_per_step": (_median_of_rank_means([g["by_dim"] for g in gathered])
                                                  if sharded else None),
        "parallel": spec.parallel,
        "peak_memory_bytes": max(g["peak_memory"] for g in gathered),
        "peak_memory_per_rank": [g["peak_memory"] for g in gathered],
        "peak_memory_kind": gathered[0]["memory_kind"],
        "start_memory_bytes": None if None in start_memory else max(start_memory),
        "wall_s": max(g["wall"] for g in gathered),
        "replicas_in_sync": max(checksums) - min(checksums) <= 1e-9 * max(1.0, abs(checksums[0])),
        "loss_curve": mean_loss,
        "step_time_curve_s": step_s,
        "bytes_curve": rank_mean_bytes,
    }


def _median_of_rank_means(per_rank: list[list[dict[str, int]]]) -> dict[str, float]:
    """Per key (a collective, a mesh dimension): median over steps of the mean over ranks of each step's bytes."""
    keys = sorted({key for steps in per_rank for step in steps for key in step})
    steps = len(per_rank[0]) if per_rank else 0
    return {key: statistics.median(sum(r[s].get(key, 0) for r in per_rank) / len(per_rank) for s in range(steps))
            for key in keys} if steps else {}


def worker_main(rank: int, world: int, port: int, cfg: BenchConfig, methods: list[tuple[int, str, MethodSpec]],
                run_dir: str, measure_wire: bool, log_level: Optional[int]) -> None:
    """Entry point of one DDP process (forked, or spawned for NCCL, by the launcher): run the methods in turn.

    Rank 0 writes ``result_<index>.json`` after each method and keeps
    ``progress`` (method index, steps done, their total time) up to date for
    the harness's hang detector.
    """
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    _run_methods(rank, world, rank, cfg, methods, run_dir, ("lo",) if measure_wire and rank == 0 else (), None,
                 log_level)


def _run_methods(rank: int, world: int, local_rank: int, cfg: BenchConfig,
                 methods: list[tuple[int, str, MethodSpec]], run_dir: str, tx_interfaces: Sequence[str],
                 node: Optional[int], log_level: Optional[int]) -> None:
    """Join the process group (``env://``: MASTER_ADDR and MASTER_PORT), run the methods in turn, write rank 0's
    results and progress to ``run_dir``."""
    if log_level is not None:
        logging.basicConfig(level=log_level, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    backend = cfg.resolved_backend
    options = None
    if backend == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        if cfg.gloo_threads is not None:
            options = dist.ProcessGroupGloo._Options()
            options._threads = cfg.gloo_threads
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=cfg.start_timeout_s),
                            pg_options=options)
    try:
        corpus = load_corpus(cfg.corpus_bytes)
        eval_set = eval_batches(corpus, cfg.eval_batches, cfg.eval_batch_size, cfg.model_spec.context,
                                seed=cfg.seed + 1234)
        for index, name, spec in methods:
            progress = (functools.partial(_write_progress, os.path.join(run_dir, "progress"), index)
                        if rank == 0 else None)
            result = _train_one(name, spec, cfg, corpus, eval_set, rank, world, device, progress, tx_interfaces,
                                node)
            if result is not None:
                _write_atomic(os.path.join(run_dir, f"result_{index}.json"), json.dumps(result))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _write_progress(path: str, index: int, steps: int, seconds: float) -> None:
    _write_atomic(path, f"{index} {steps} {seconds:.6f}\n")


def _read_tx(interfaces: Sequence[str]) -> list[int]:
    return [read_tx_bytes(interface) for interface in interfaces]


def _wire_bytes(readings: list[dict[str, Any]], world: int,
                steps: int) -> tuple[Optional[float], Optional[float], Optional[float], Optional[float]]:
    """From the ranks' tx readings (see :func:`_train_one`): wire bytes per worker per step (all interfaces of all
    readers over ``world``; median over steps, and the loop's mean), and the bytes of :data:`NODE_INTERFACE` per
    node per step (mean over the nodes; median over steps, and the loop's mean). None where nothing was read."""
    readers = [r for r in readings if r["marks"]]
    if not readers:
        return None, None, None, None
    wire_steps = [sum(sum(r["marks"][s + 1]) - sum(r["marks"][s]) for r in readers) / world for s in range(steps)]
    wire_mean = sum(sum(r["end"]) - sum(r["marks"][0]) for r in readers) / (world * steps)
    uplinks = [(r, r["interfaces"].index(NODE_INTERFACE)) for r in readers if NODE_INTERFACE in r["interfaces"]]
    if not uplinks:
        return statistics.median(wire_steps), wire_mean, None, None
    node_steps = [sum(r["marks"][s + 1][i] - r["marks"][s][i] for r, i in uplinks) / len(uplinks)
                  for s in range(steps)]
    node_mean = sum(r["end"][i] - r["marks"][0][i] for r, i in uplinks) / (len(uplinks) * steps)
    return statistics.median(wire_steps), wire_mean, statistics.median(node_steps), node_mean


#: Environment variable in which the harness tells each node's torchrun which emulated node it runs on.
NODE_ENV: str = "PYCOMM_BENCH_NODE"


def torchrun_main(spec_path: str) -> None:
    """One DDP process started by ``torchrun`` on an emulated node: rank, world size and local rank from
    torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; the process group from ``env://``), the
    run from ``spec_path`` (the launcher's pickle). Local rank 0 reads the node's ``lo`` and uplink counters."""
    with open(spec_path, "rb") as fh:
        cfg, methods, run_dir, measure_wire, log_level = pickle.load(fh)
    rank, world, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    node = int(os.environ[NODE_ENV]) if NODE_ENV in os.environ else None
    tx_interfaces = ("lo", NODE_INTERFACE) if measure_wire and local_rank == 0 else ()
    _run_methods(rank, world, local_rank, cfg, methods, run_dir, tx_interfaces, node, log_level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pycomm.bench.worker --spec SPEC``: one torchrun-started process (see :func:`torchrun_main`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--spec":
        print("usage: torchrun ... -m pycomm.bench.worker --spec SPEC (internal; run `pycomm bench e2e --nodes`)",
              file=sys.stderr)
        return 2
    torchrun_main(args[1])
    return 0


if __name__ == "__main__":
    # run the imported module's main, so that pickles see one pycomm.bench.worker, not __main__
    from pycomm.bench.worker import main as _module_main

    sys.exit(_module_main())

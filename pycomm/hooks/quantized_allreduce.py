"""DDP communication hook: quantized scatter-reduce-allgather with error feedback."""

# No `from __future__ import annotations`: DDP inspects the hook's real annotations.

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from pycomm import ops
from pycomm.hooks.hook_state import HookState
from pycomm.distributed import chunk_layout, mix_seed, quantized_all_reduce

__all__ = ["QuantState", "quantized_allreduce_hook"]

logger = logging.getLogger(__name__)


@dataclass
class _BucketPlan:
    """How one DDP bucket is split between the quantized and the plain path."""

    signature: tuple
    table: Optional[torch.Tensor]            # bucket table over the compressed layers, or None
    dense: list[tuple[int, int]]             # (offset, length) of layers all-reduced uncompressed
    worker_residual: Optional[torch.Tensor]  # float32, numel of the bucket buffer
    server_residual: Optional[torch.Tensor]  # float32, buckets_per_chunk * bucket_size


class QuantState(HookState):
    """State of :func:`quantized_allreduce_hook`.

    Args:
        process_group: the group to reduce over (None: the default group).
        bits: bits per element, 1..8.
        bucket_size: elements per quantization bucket (a multiple of 8). Each layer gets its own buckets.
        stochastic: unbiased stochastic rounding; otherwise round to nearest.
        error_feedback: keep the worker residual (first quantization) and the "server" residual
            (re-quantization of this rank's reduced chunk) and add them back the next step.
        start_iter: iterations run with plain all-reduce before compression starts. The default
            also skips DDP's first iteration, after which DDP rebuilds its buckets.
        min_numel: layers with fewer elements, and every layer with ``dim <= 1`` (biases, norms),
            are all-reduced uncompressed.
        seed: base seed of stochastic rounding (mixed with the step, the bucket and the rank).

    Residuals are per rank: checkpoint each rank's :meth:`state_dict` (e.g. to
    ``f"quant_rank{rank}.pt"``) and load it on the same rank. Pickling the state
    (``__getstate__``) drops the process group; it is set to the default group on load.

    Example::

        import torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from pycomm.hooks import QuantState, quantized_allreduce_hook

        dist.init_process_group("gloo")          # run under torchrun
        model = DDP(torch.nn.Linear(1024, 1024))
        state = QuantState(bits=4)
        model.register_comm_hook(state, quantized_allreduce_hook)
        model(torch.randn(8, 1024)).sum().backward()
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, bits: int = 4, bucket_size: int = 512,
                 stochastic: bool = True, error_feedback: bool = True, start_iter: int = 2, min_numel: int = 1024,
                 seed: int = 0) -> None:
        ops._check_bits_bucket(bits, bucket_size)
        if start_iter < 0 or min_numel < 0:
            raise ValueError(f"start_iter and min_numel must be >= 0, got {start_iter} and {min_numel}")
        self.process_group = process_group
        self.bits = bits
        self.bucket_size = bucket_size
        self.stochastic = stochastic
        self.error_feedback = error_feedback
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.seed = seed
        self.iter = 0
        self._plans: dict[int, _BucketPlan] = {}
        self._pending: dict[int, dict[str, Any]] = {}  # residuals loaded before their bucket is seen

    # -- persistence -------------------------------------------------------
    _CONFIG = ("bits", "bucket_size", "stochastic", "error_feedback", "start_iter", "min_numel", "seed", "iter")

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: configuration, iteration and its own residuals per DDP bucket."""
        residuals = {
            index: {"signature": plan.signature, "worker": plan.worker_residual, "server": plan.server_residual}
            for index, plan in self._plans.items()
        }
        return {**{k: getattr(self, k) for k in self._CONFIG}, "residuals": residuals}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; residuals are matched to buckets when the hook next sees them."""
        for k in self._CONFIG:
            setattr(self, k, state_dict[k])
        self._plans.clear()
        self._pending = dict(state_dict.get("residuals", {}))

    # -- planning ------------------------------------------------------------
    def _plan(self, bucket: dist.GradBucket) -> _BucketPlan:
        buffer = bucket.buffer()
        params = bucket.parameters()
        signature = (buffer.numel(), buffer.dtype, tuple(tuple(p.shape) for p in params))
        plan = self._plans.get(bucket.index())
        if plan is not None and plan.signature == signature:
            return plan
        if plan is not None:
            logger.info("pycomm quant: bucket %d changed layout; its residuals are reset", bucket.index())
        world = dist.get_world_size(self.process_group)
        compressed, dense, offset = [], [], 0
        for p in params:
            n = p.numel()
            if p.dim() > 1 and n >= self.min_numel:
                compressed.append((offset, n))
            elif n:
                dense.append((offset, n))
            offset += n
        table, worker, server = None, None, None
        if compressed:
            table = ops.bucket_table(compressed, self.bucket_size, pad_to_multiple=world, device=buffer.device)
            if self.error_feedback:
                _, per_chunk = chunk_layout(buffer.numel(), self.bucket_size, world, table)
                worker = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
                server = torch.zeros(per_chunk * self.bucket_size, dtype=torch.float32, device=buffer.device)
        pending = self._pending.pop(bucket.index(), None)
        if pending is not None and pending["signature"] == signature:
            worker = None if pending["worker"] is None else pending["worker"].to(buffer.device)
            server = None if pending["server"] is None else pending["server"].to(buffer.device)
        plan = _BucketPlan(signature, table, dense, worker, server)
        self._plans[bucket.index()] = plan
        return plan


def _allreduce_mean(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.futures.Future:
    world = dist.get_world_size(group)
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))


def quantized_allreduce_hook(state: QuantState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP bucket across ranks, quantized (see :class:`QuantState`).

    Register with ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``
    or in one line with ``pycomm.register(ddp_model, "quant", bits=4)``.
    Layers with ``dim <= 1`` or fewer than ``min_numel`` elements, and every layer
    before ``start_iter``, are all-reduced uncompressed.
    """
    group = state.process_group
    buffer = bucket.buffer()
    if bucket.is_last():
        state.iter += 1
    step = state.iter - (1 if bucket.is_last() else 0)
    if step < state.start_iter or buffer.dtype not in ops.SUPPORTED_DTYPES:
        return _allreduce_mean(buffer, group)
    plan = state._plan(bucket)
    if plan.table is None:
        return _allreduce_mean(buffer, group)

    world = dist.get_world_size(group)
    small = torch.cat([buffer[o:o + n] for o, n in plan.dense]) if plan.dense else None
    fut = quantized_all_reduce(
        buffer, bits=state.bits, bucket_size=state.bucket_size, op=dist.ReduceOp.AVG, group=group, async_op=True,
        stochastic=state.stochastic, seed=mix_seed(state.seed, step, bucket.index()),
        worker_residual=plan.worker_residual, server_residual=plan.server_residual, bucket_table=plan.table)
    if small is None:
        return fut
    # The small layers travel uncompressed, after the quantized part (which may
    # fall back to reducing the whole buffer on overflow; these values win).
    dist.all_reduce(small, group=group)
    small.div_(world)

    def write_back(f: torch.futures.Future) -> torch.Tensor:
        out = f.value()
        start = 0
        for o, n in plan.dense:
            out[o:o + n].copy_(small[start:start + n])
            start += n
        return out

    return fut.then(write_back)

"""DDP communication hook: L-GreCo, per-layer compression chosen by an optimal DP solver, re-solved in training."""

# No `from __future__ import annotations`: DDP inspects the hook's real annotations.

import collections
import itertools
import logging
import math
import zlib
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from pycomm import layer_errors, lgreco
from pycomm.distributed import mix_seed
from pycomm.hooks import agreement
from pycomm.hooks import hierarchy as _hierarchy
from pycomm.hooks.dgc import DGCState, dgc_hook
from pycomm.hooks.hook_state import HookState, Layer, LayerKey
from pycomm.hooks.param_state import log_skipped, param_tensors_for_load
from pycomm.hooks.quantized_allreduce import QuantState, quantized_allreduce_hook

__all__ = ["LGreCoState", "lgreco_hook", "QUANT_CANDIDATES", "density_grid"]

logger = logging.getLogger(__name__)

#: Bit widths L-GreCo chooses from for the quantization family.
QUANT_CANDIDATES = (2, 3, 4, 5, 6, 8)



def density_grid(default: float, factors: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)) -> tuple[float, ...]:
    """Top-k densities on a geometric grid around ``default`` (capped at 1, duplicates removed)."""
    if not 0.0 < default <= 1.0:
        raise ValueError(f"default density must be in (0, 1], got {default}")
    return tuple(sorted({min(1.0, default * f) for f in factors}))


class LGreCoState(HookState):
    """State of :func:`lgreco_hook`: L-GreCo on top of the quantization or the DGC hook.

    Layers differ in size and in how much compression hurts them. Every ``period`` steps,
    L-GreCo measures for each compressed layer l and each candidate setting c the L2 norm of
    the compression error ``||C_c(g_l) - g_l||`` of the layer's gradient accumulated over the
    last ``acc_steps`` steps (including the error-feedback residual for quantization, the
    momentum-corrected velocity for DGC), with the hooks' real kernels. The tables are averaged
    across ranks with one ``all_reduce``; then every rank runs the same deterministic DP solver
    (:func:`pycomm.lgreco.solve`) and picks, per layer, the setting that minimises the bytes sent
    subject to ``total error <= alpha * (total error of the uniform default)``. The inner hook
    applies the per-layer settings inside each DDP bucket (one kernel launch per phase).

    Schedule: steps ``< start_iter`` run the uniform ``default``. Solves happen at the end of
    steps ``start_iter - 1 + j * period`` (j = 0, 1, ...), each from the gradients of the
    ``acc_steps`` steps before it, and apply from the next step on.

    Args:
        process_group: the group (None: the default group).
        family: ``"quant"`` (bit widths, :class:`~pycomm.hooks.QuantState`) or ``"topk"``
            (top-k densities, :class:`~pycomm.hooks.DGCState`).
        default: the uniform setting that defines the error budget: bits (default 4) or
            density (default 0.001).
        candidates: settings to choose from (default: bits ``(2, 3, 4, 5, 6, 8)``, or
            :func:`density_grid` of the default: 1/8x .. 8x). The default is always added.
        start_iter: steps with the uniform default before the first solve.
        period: steps between solves.
        acc_steps: steps whose gradients are accumulated before each solve (``<= period``).
        alpha: error budget as a multiple of the uniform default's total error.
        levels: discretisation levels of the error budget (see :func:`pycomm.lgreco.solve`).
        hierarchy: ``"flat"`` (default), ``"auto"`` or ``"node"`` (see :mod:`pycomm.hooks.hierarchy`).
            In node mode each rank accumulates and measures the layers of its own shard (on the
            node-averaged gradient); the error tables are averaged among the ranks that hold the
            same shard on the other nodes and gathered inside each node, so every rank solves the
            same whole table and applies the same per-layer choice.
        **options: passed to the inner state (e.g. ``bucket_size``, ``stochastic``,
            ``error_feedback`` for quant; ``momentum``, ``warmup_steps``, ``exact`` for topk).

    During an accumulation window the state holds one float32 copy of each bucket's gradient.
    A solve reads its table on the host (one device synchronisation per period on CUDA).
    If a table holds NaN or Inf (an overflow step inside the window, seen by every rank after
    the all-reduce), that solve is skipped and the current choice stays. Each solve is logged
    with ``logging`` (layers, histogram of chosen settings, bytes per step against uniform).

    Checkpoint per rank, like the inner hooks: :meth:`state_dict` holds the inner state (with
    its residuals and the per-layer choice), the schedule and the accumulators.

    Example::

        import torch, torch.distributed as dist, pycomm
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo")          # under torchrun
        model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)))
        state = pycomm.register(model, "lgreco", family="quant", default=4, start_iter=10, period=100)
        for _ in range(20):
            model(torch.randn(8, 256)).sum().backward()
        print(state.choice, state.compression_ratio)
    """

    _CONFIG = ("family", "default", "candidates", "start_iter", "period", "acc_steps", "alpha", "levels")

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, family: str = "quant",
                 default: Optional[Union[int, float]] = None, candidates: Optional[Sequence[Union[int, float]]] = None,
                 start_iter: int = 1000, period: int = 1000, acc_steps: int = 10, alpha: float = 1.0,
                 levels: int = 10000, hierarchy: str = "flat", **options: Any) -> None:
        if family == "quant":
            default = 4 if default is None else int(default)
            candidates = QUANT_CANDIDATES if candidates is None else tuple(int(c) for c in candidates)
            if any(not 1 <= c <= 8 for c in candidates):
                raise ValueError(f"quant candidates must be bit widths in 1..8, got {candidates}")
            self.inner: Union[QuantState, DGCState] = QuantState(process_group, bits=default, **options)
        elif family == "topk":
            default = 0.001 if default is None else float(default)
            candidates = density_grid(default) if candidates is None else tuple(float(c) for c in candidates)
            if any(not 0.0 < c <= 1.0 for c in candidates):
                raise ValueError(f"topk candidates must be densities in (0, 1], got {candidates}")
            self.inner = DGCState(process_group, density=default, **options)
        else:
            raise ValueError(f"family must be 'quant' or 'topk', got {family!r}")
        # The hierarchy is this state's: in node mode the inner hook runs flat on each shard.
        self.inner.hierarchy = "flat"
        self.inner._nested = True
        self.hierarchy = _hierarchy.validated_hierarchy(hierarchy)
        if start_iter < 0 or period < 1 or not 1 <= acc_steps <= period:
            raise ValueError(f"need start_iter >= 0, period >= 1 and 1 <= acc_steps <= period; got "
                             f"start_iter={start_iter}, period={period}, acc_steps={acc_steps}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.family = family
        self.default = default
        self.candidates = tuple(sorted(set(candidates) | {default}))
        self.start_iter = start_iter
        self.period = period
        self.acc_steps = acc_steps
        self.alpha = float(alpha)
        self.levels = int(levels)
        self.last_solve: Optional[dict[str, Any]] = None
        # parameter name -> float32 sum of its observed values in the current window, parameter-sized
        # (in node mode zero outside the piece of the parameter that this rank's shard holds)
        self._accumulators: dict[str, torch.Tensor] = {}
        # parameter name -> (offset in the parameter, length) of the piece observed last (node mode:
        # the piece of this rank's shard; flat mode: the whole parameter); not in state_dict
        self._observed: dict[str, tuple[int, int]] = {}

    # The process group lives in the inner state; pickling drops it there.
    @property
    def process_group(self) -> Optional[dist.ProcessGroup]:  # type: ignore[override]
        return self.inner.process_group

    @process_group.setter
    def process_group(self, group: Optional[dist.ProcessGroup]) -> None:
        if "inner" in self.__dict__:
            self.inner.process_group = group

    # -- parameter names ---------------------------------------------------------------
    def bind(self, model: Any) -> "LGreCoState":
        """Bind the inner state (and this one) to the model's parameter names; see
        :meth:`pycomm.hooks.hook_state.HookState.bind`."""
        self.inner.bind(model)
        self._names = self.inner.parameter_names
        self._check_bound()
        self._settle_hierarchy()
        return self

    def _check_bound(self) -> None:
        skipped: list[str] = []
        loaded = {name: {"accumulated": t} for name, t in self._accumulators.items()}
        kept = param_tensors_for_load(loaded, self._names, {"accumulated": True}, True, skipped)
        self._accumulators = {name: fields["accumulated"].reshape(-1) for name, fields in kept.items()}

    # -- what the hook exposes ------------------------------------------------
    @property
    def choice(self) -> dict[LayerKey, Union[int, float]]:
        """The current per-layer setting, ``{parameter name: bits or density}`` (empty: uniform)."""
        return dict(self.inner.layer_params)

    @property
    def compression_ratio(self) -> Optional[float]:
        """fp32 bytes of the compressed layers over their bytes at the current choice (None before a solve)."""
        return None if self.last_solve is None else self.last_solve["compression_ratio"]

    @property
    def iter(self) -> int:
        """Iterations counted by the inner hook."""
        return self.inner.iter

    @iter.setter
    def iter(self, step: int) -> None:
        self.inner.iter = step

    # -- schedule -------------------------------------------------------------------
    def _next_solve_end(self, step: int) -> int:
        """The first solve point t (solve after step t - 1) with t > step."""
        if step < self.start_iter:
            return self.start_iter
        return self.start_iter + ((step - self.start_iter) // self.period + 1) * self.period

    def observing(self, step: int) -> bool:
        """Whether ``step``'s gradients go into the next error table (never step 0: DDP
        rebuilds its buckets after the first iteration, so layer keys are stable from step 1)."""
        return step >= 1 and step >= self._next_solve_end(step) - self.acc_steps

    def solves_after(self, step: int) -> bool:
        """Whether a solve runs at the end of ``step``."""
        return step + 1 == self._next_solve_end(step)

    # -- accumulation -----------------------------------------------------------------
    def _observe(self, values: torch.Tensor, layers: list[Layer]) -> None:
        params = self._require_names().params
        observed = self.__dict__.setdefault("_observed", {})
        for name, offset, length, start in layers:
            piece = values[offset:offset + length]
            total = self._accumulators.get(name)
            numel = params[name].numel()
            if total is None or total.numel() != numel:
                if start == 0 and length == numel:
                    self._accumulators[name] = piece.detach().to(torch.float32, copy=True)
                    observed[name] = (start, length)
                    continue
                total = self._accumulators[name] = torch.zeros(numel, dtype=torch.float32, device=values.device)
            total[start:start + length].add_(piece)
            observed[name] = (start, length)

    # -- solving ------------------------------------------------------------------------
    def _tables(self) -> tuple[list[LayerKey], list[int], torch.Tensor, list[list[int]]]:
        """The observed layers (model order), their lengths, the error table and the sizes table. The
        errors of every layer are measured in one launch per candidate over their concatenation."""
        names = self._require_names()
        keys = [name for name in names.params if name in self._accumulators]
        observed = self.__dict__.get("_observed", {})
        places = [observed.get(name, (0, self._accumulators[name].numel())) for name in keys]
        lengths = [length for _, length in places]
        if not keys:
            return keys, lengths, torch.zeros(0, len(self.candidates), dtype=torch.float64), []
        # Each row is the piece this rank observed (node mode: its shard's piece of the parameter)
        values = torch.cat([self._accumulators[name][start:start + length]
                            for name, (start, length) in zip(keys, places)])
        slices = list(zip(itertools.accumulate(lengths[:-1], initial=0), lengths))
        seed = mix_seed(self.inner.seed, self.inner.iter, 0x1C)
        if self.family == "quant":
            inner: QuantState = self.inner  # type: ignore[assignment]
            table = layer_errors.quantization_errors(values, slices, self.candidates, inner.bucket_size,
                                                     inner.stochastic, seed)
            sizes = layer_errors.quantization_sizes(lengths, self.candidates, inner.bucket_size)
        else:
            dgc: DGCState = self.inner  # type: ignore[assignment]
            table = layer_errors.topk_errors(values, slices, self.candidates, dgc.exact, dgc.sample_ratio, seed)
            value_bytes = torch.tensor([], dtype=dgc.value_dtype).element_size()
            sizes = layer_errors.topk_sizes(lengths, self.candidates, value_bytes)
        return keys, lengths, table, sizes

    def _solve(self, step: int) -> None:
        keys, lengths, errors, sizes = self._tables()
        self._accumulators.clear()
        self.__dict__.get("_observed", {}).clear()
        group = self.process_group  # in node mode: the inter-node group of this rank's shard
        agreed = True
        if keys and dist.get_world_size(group) > 1:
            # Every rank has the same layers in the same order (DDP's buckets agree), unless a
            # bucket overflowed on one rank at every step of the window (then that rank did not
            # observe it). Agree on that first, so the all-reduce below never mismatches.
            agreed = _same_on_all_ranks(keys, errors.device, group)
            if agreed:
                dist.all_reduce(errors, group=group)
                errors.div_(dist.get_world_size(group))
        groups = getattr(self, "_node_groups", None)
        if groups is not None:  # every local rank holds its shard's rows: all of them, on every rank
            agreed, keys, lengths, errors, sizes = self._node_tables(agreed, keys, lengths, errors, sizes, groups)
        if not agreed:
            logger.warning("pycomm lgreco: ranks observed different layers before step %d (overflow "
                           "steps); keeping the current choice", step + 1)
            return
        if not keys:  # the same on every rank: the layers come from DDP's buckets
            logger.info("pycomm lgreco: no compressed layer was observed before step %d; nothing to solve", step + 1)
            return
        errors = errors.cpu()
        if not bool(torch.isfinite(errors).all()):
            logger.warning("pycomm lgreco: the error table of step %d holds NaN/Inf (an overflow step); "
                           "keeping the current choice", step + 1)
            return
        default_column = self.candidates.index(self.default)
        budget = self.alpha * float(errors[:, default_column].sum())
        solution = lgreco.solve(errors, sizes, budget, levels=self.levels)
        choice = list(solution.choice)
        uniform_bytes = sum(row[default_column] for row in sizes)
        chosen_bytes = sum(row[c] for row, c in zip(sizes, choice))
        uniform_error = float(errors[:, default_column].sum())
        if uniform_error <= budget and (chosen_bytes > uniform_bytes or not solution.feasible):
            # Rounding every layer's error up can cost the DP up to one level per layer, so with
            # many layers it may miss the uniform setting, which fits the budget when alpha >= 1.
            choice = [default_column] * len(keys)
            chosen_bytes = uniform_bytes
            solution = lgreco.Solution(choice, float(uniform_bytes), uniform_error, True)
        mapping = {key: self.candidates[c] for key, c in zip(keys, choice)}
        self.inner.set_layer_params(mapping)
        agreement.mark_agreed(self.inner)  # every rank solved the same table: nothing to check
        histogram = dict(sorted(collections.Counter(mapping.values()).items()))
        self.last_solve = {
            "step": step + 1, "layers": len(keys), "histogram": histogram, "feasible": solution.feasible,
            "budget": budget, "error": solution.error, "uniform_error": uniform_error,
            "bytes": chosen_bytes, "uniform_bytes": uniform_bytes,
            "bytes_vs_uniform": uniform_bytes / chosen_bytes if chosen_bytes else float("inf"),
            "compression_ratio": 4 * sum(lengths) / chosen_bytes if chosen_bytes else float("inf"),
        }
        logger.info("pycomm lgreco (%s): solved %d layers at step %d: choice histogram %s, %d bytes per step "
                    "against %d uniform (%.2fx fewer), error %.4g of budget %.4g%s", self.family, len(keys),
                    step + 1, histogram, chosen_bytes, uniform_bytes, self.last_solve["bytes_vs_uniform"],
                    solution.error, budget, "" if solution.feasible else " (infeasible: least-error fallback)")

    def _node_tables(self, agreed: bool, keys: list[LayerKey], lengths: list[int], errors: torch.Tensor,
                     sizes: list[list[int]], groups: Any) -> tuple[bool, list[LayerKey], list[int], torch.Tensor,
                                                                   list[list[int]]]:
        """Node mode: gather every local rank's rows (its shard's layers, averaged over the nodes)
        inside the node and merge them in model order; the same on every rank of the node, and on
        every node (each shard's rows are the same on all its inter-node ranks)."""
        own = (agreed, keys, lengths, errors.cpu(), sizes)
        everyone: list[Any] = [None] * groups.per_node
        dist.all_gather_object(everyone, own, group=groups.intra)
        if not all(entry[0] for entry in everyone):
            return False, [], [], errors, []
        # A parameter cut by the shards has one row per piece (each on the local rank that holds it):
        # merged into one row per parameter, its norms combined as sqrt(sum of squares) and its
        # bytes and lengths summed (each piece is sent as a layer of its own), so the solve picks
        # one setting per parameter, the same on every rank, which then applies to each piece.
        merged: dict[LayerKey, list[Any]] = {}
        for _, ks, ls, table, ss in everyone:
            for key, length, row, size in zip(ks, ls, table, ss):
                if key in merged:
                    entry = merged[key]
                    entry[0] += length
                    entry[1] = (entry[1].square() + row.square()).sqrt()
                    entry[2] = [a + b for a, b in zip(entry[2], size)]
                else:
                    merged[key] = [length, row, list(size)]
        order = self._require_names().indices
        keys = sorted(merged, key=lambda key: order[key])
        table = (torch.stack([merged[key][1] for key in keys]) if keys
                 else torch.zeros(0, len(self.candidates), dtype=torch.float64))
        return True, keys, [merged[key][0] for key in keys], table, [merged[key][2] for key in keys]

    # -- persistence ---------------------------------------------------------------------
    _METHOD = "lgreco"

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the configuration, the step, the inner state (its per-parameter state
        and the per-layer choice, by parameter name), the last solve and the accumulated window
        (``params[name]["accumulated"]``)."""
        accumulated = {name: {"accumulated": t.clone()} for name, t in sorted(self._accumulators.items())}
        if self._names is not None:
            accumulated = {name: {"accumulated": f["accumulated"].reshape(self._names.params[name].shape)}
                           for name, f in accumulated.items()}
        return {**self._header(), "inner": self.inner.state_dict(), "last_solve": self.last_solve,
                "params": accumulated}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` (see :meth:`QuantState.load_state_dict` for ``strict``)."""
        skipped: list[str] = []
        self._read_header(state_dict, strict, skipped)
        self.inner.load_state_dict(state_dict["inner"], strict=strict)
        self.last_solve = state_dict.get("last_solve")
        kept = param_tensors_for_load(state_dict.get("params", {}), self._names, {"accumulated": True}, strict,
                                      skipped)
        self._accumulators = {name: fields["accumulated"].reshape(-1) for name, fields in kept.items()}
        self.__dict__.get("_observed", {}).clear()
        log_skipped(self._METHOD, skipped)
        agreement.settings_changed(self)


def _same_on_all_ranks(keys: list[LayerKey], device: torch.device, group: Optional[dist.ProcessGroup]) -> bool:
    digest = zlib.crc32("\n".join(keys).encode())
    summary = torch.tensor([len(keys), digest], dtype=torch.int64, device=device)
    both = torch.cat([summary, -summary])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(both[:2], -both[2:]))


def lgreco_hook(state: LGreCoState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP bucket with the inner hook, using L-GreCo's per-layer settings (see :class:`LGreCoState`).

    Register with ``ddp_model.register_comm_hook(state, lgreco_hook)`` or in one line with
    ``pycomm.register(ddp_model, "lgreco", family="quant", default=4)``.
    """
    state._require_names()
    agreement.check_settings(state, bucket, "lgreco")
    if (routed := _hierarchy.route(state, bucket, lgreco_hook)) is not None:  # node mode
        return routed
    step = state.inner.iter  # the inner hook counts iterations on the last bucket
    state.inner.observer = state._observe if state.observing(step) else None
    inner_hook: Callable[..., torch.futures.Future] = (
        quantized_allreduce_hook if state.family == "quant" else dgc_hook)
    fut = inner_hook(state.inner, bucket)
    if bucket.is_last() and state.solves_after(step):
        state._solve(step)
    return fut

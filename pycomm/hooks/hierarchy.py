"""Hierarchical compression: full precision inside a node, the method's compression between nodes.

With ``hierarchy="node"`` on N nodes of M ranks each, every hook runs one DDP bucket as:

1. **reduce-scatter inside the node**, uncompressed: the bucket's parameters are cut into M
   contiguous runs of whole parameters (balanced by element count; a run may be empty when the
   bucket has fewer parameters than M), padded to equal length; local rank j receives the sum of
   run j over its node and divides it by M (the node's average gradient of its shard);
2. **the method's own (flat) algorithm on that shard**, among the N ranks that hold the same shard
   on the other nodes (the *inter-node group*): quantization, top-k, projection, with the state
   of the shard's parameters. Their result is identical on those N ranks and is the average over
   all W = N*M ranks;
3. **all-gather inside the node**, uncompressed, of every local rank's shard back into the bucket,
   so all W ranks end bit-identical.

Only step 2 crosses nodes. It sends the method's compressed payload of 1/M of the bucket per
rank, so a node sends one compressed copy of the bucket per step instead of M.

Per method, step 2 is the method's flat hook with the node as one worker:

- quant: the node average of the shard is quantized once (error feedback of the shard), summed
  with the other nodes' and re-quantized once by the chunk's owner, as in flat mode with W = N.
- dgc: u and v accumulate the node's average gradient of the shard (``u = m u + g_node``), clipping
  uses ``clip_norm / sqrt(N)``, and top-k selects from that node velocity. Momentum correction is
  linear, so it commutes with the intra-node average (at density 1 node mode equals flat mode up to
  rounding); top-k of the node's sum keeps the k largest entries of what the node really owes
  instead of M separate per-rank selections, and a node sends one sparse payload per shard rather
  than M. The cost is fewer accumulators (one per node and shard instead of one per rank).
- spsa-projection: each shard is projected on its own K directions (model-offset keyed, so a
  parameter's directions are those of flat mode); K bytes per shard per rank cross nodes.
- lgreco: each rank measures the layers of its shard; the error tables are averaged among the
  inter-node group, gathered inside the node and solved as one table, so every rank applies the
  same per-layer choice.

Per-parameter state (error feedback, DGC's u and v, L-GreCo's accumulated window) belongs to the
local rank that owns the parameter's shard: each rank's ``state_dict()`` holds only its own
shard's parameters, as they are among the N ranks of its inter-node group. Save every rank's
state dict (:func:`pycomm.checkpoint.gather_state_dicts`) and load rank r's entry on rank r of a
run with the same nodes and ranks per node. When the owner of a parameter changes (DDP rebuilds
its buckets after the first iteration, a resumed run starts from another bucket layout or another
``bucket_cap_mb``), the ranks of each node hand the parameter's state to its new owner once, at
that layout change: each contributes what it holds and zeros elsewhere to one all-reduce inside
the node (exact: only one rank holds a non-zero value).

Why whole parameters and not equal element ranges: every method keys its state and its random
draws by parameter name; a shard of whole parameters lets each method's per-bucket plans work on
the shard unchanged. The cost is padding (the longest run sets the length of the intra-node
collectives) and shards of unequal size; the bytes that cross nodes do not depend on the cut.

Costs besides the compressed payload: the intra-node reduce-scatter and all-gather of the padded
bucket (uncompressed, inside the node), the wait for the shard's result before the all-gather (on
CPU; on CUDA it only orders streams), at each layout change one intra-node all-reduce of the
bucket's state, and once, at ``bind``, one ``all_gather_object`` of every rank's node.

Non-finite gradients: the intra-node sum carries a NaN/Inf into its shard, the method's flat path
handles it there as it does in flat mode (on CPU an uncompressed all-reduce of that shard among the
inter-node group; on CUDA a NaN shard), and the all-gather gives it to every rank of the node.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from pycomm.distributed import all_gather_into_tensor
from pycomm.topology import NodeMap, TopologyError, discover

__all__ = ["HIERARCHIES", "validated_hierarchy", "NodeGroups", "settle", "node_groups", "route", "node_step",
           "shard_cut"]

logger = logging.getLogger(__name__)

#: The values of a state's ``hierarchy``.
HIERARCHIES = ("auto", "flat", "node")


def validated_hierarchy(value: Any) -> str:
    """``value`` if it is one of :data:`HIERARCHIES`, else ValueError."""
    if value not in HIERARCHIES:
        raise ValueError(f"hierarchy must be one of {', '.join(repr(h) for h in HIERARCHIES)}, got {value!r}")
    return value


@dataclass
class NodeGroups:
    """This rank's place in the node topology and the two groups of hierarchical mode."""

    nodes: int                     # N
    per_node: int                  # M
    local_index: int               # j: this rank owns shard j of every bucket
    intra: dist.ProcessGroup       # the M ranks of this node
    inter: dist.ProcessGroup       # the N ranks with local index j, one per node
    node_map: NodeMap


def _group_is_world(group: Optional[dist.ProcessGroup]) -> bool:
    return group is None or dist.get_world_size(group) == dist.get_world_size()


def settle(state: Any) -> None:
    """Resolve ``state.hierarchy`` into ``state._node_groups`` (None: flat) and ``state._resolved``.

    A collective over the state's group (one ``all_gather_object`` of each rank's node and
    setting; in node mode also the creation of the subgroups over the world): ``pycomm.register``
    (``bind``) calls it on every rank, or else the first hook call does. A setting that differs
    between ranks raises the same ``RankDisagreementError`` on every rank.

    Raises:
        ValueError: ``"node"`` with nodes of unequal sizes, or with a process group that is not the
            whole world.
    """
    from pycomm.hooks.agreement import RankDisagreementError

    setting = validated_hierarchy(getattr(state, "hierarchy", "flat"))
    group = state.process_group
    node_map, settings = discover(group, setting)
    if len(set(settings)) > 1:
        raise RankDisagreementError(
            "pycomm: the ranks disagree on hierarchy (" + ", ".join(f"rank {r}: {s!r}" for r, s in enumerate(settings))
            + "); every rank must pass the same hierarchy")
    state._node_groups = None
    state._resolved = "flat"
    if setting == "flat" or not (dist.is_available() and dist.is_initialized()):
        return
    per_node = node_map.ranks_per_node
    problem = None
    if per_node is None:
        problem = f"the nodes have different numbers of ranks ({node_map.describe()})"
    elif not _group_is_world(group):
        problem = ("its process group is not the whole world (the node subgroups are built over the world; "
                   "pass process_group=None)")
    if problem is not None:
        if setting == "node":
            raise ValueError(f"hierarchy='node' needs every node to have the same number of ranks in the default "
                             f"process group, but {problem}; use hierarchy='flat' or 'auto'")
        if len(node_map.nodes) > 1:
            logger.info("pycomm: hierarchy='auto' runs flat: %s", problem)
        return
    if len(node_map.nodes) == 1 and setting == "auto":
        return  # one node: nothing crosses a slow link
    if per_node == 1:
        return  # one rank per node: the hierarchical step is the flat one
    intra, _ = dist.new_subgroups_by_enumeration([list(ranks) for ranks in node_map.nodes])
    inter, _ = dist.new_subgroups_by_enumeration(
        [[ranks[j] for ranks in node_map.nodes] for j in range(per_node)])
    rank = dist.get_rank(group)
    state._node_groups = NodeGroups(len(node_map.nodes), per_node, node_map.local_index(rank), intra, inter, node_map)
    state._resolved = "node"
    logger.info("pycomm: hierarchy=%r runs node mode on %s", setting, node_map.describe())


def node_groups(state: Any) -> Optional[NodeGroups]:
    """The state's node groups (None: run flat). Resolves the hierarchy at the first call if
    ``bind`` could not (no process group yet); None inside :func:`node_step`'s own call of the hook."""
    if getattr(state, "_in_node_step", False) or getattr(state, "_nested", False):
        return None
    if "_resolved" not in state.__dict__:
        settle(state)
    return state._node_groups


@dataclass
class _Layout:
    """How one DDP bucket layout is cut into the M shards."""

    signature: tuple
    bounds: list[tuple[int, int]]  # per local rank: (first parameter, end parameter) of its run
    spans: list[tuple[int, int]]   # per local rank: (offset, length) of its run in the bucket buffer
    padded: int                    # L: the length of every shard in the intra-node collectives


def shard_cut(numels: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut parameters of ``numels`` elements (in bucket order) into ``parts`` contiguous runs of
    about equal element counts: the run boundaries are the parameter boundaries nearest to
    ``j * total / parts``. Returns ``(first, end)`` parameter indices per run (possibly empty)."""
    prefix = list(itertools.accumulate(numels, initial=0))
    total = prefix[-1]
    cuts = [0]
    for j in range(1, parts):
        target = j * total / parts
        best = min(range(cuts[-1], len(numels) + 1), key=lambda i: (abs(prefix[i] - target), i))
        cuts.append(best)
    cuts.append(len(numels))
    return list(zip(cuts[:-1], cuts[1:]))


class _ShardBucket:
    """What a hook reads of a ``dist.GradBucket``, for this rank's shard of a bucket."""

    def __init__(self, buffer: torch.Tensor, params: list[torch.Tensor], index: int, last: bool) -> None:
        self._buffer, self._params, self._index, self._last = buffer, params, index, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


@contextlib.contextmanager
def _over_inter_group(state: Any, groups: NodeGroups) -> Iterator[None]:
    """Run the hook's flat algorithm among the inter-node group (the hooks communicate over
    ``state.process_group``); the state's own group is restored afterwards."""
    saved = state.process_group
    state.process_group = groups.inter
    state._in_node_step = True
    try:
        yield
    finally:
        state.process_group = saved
        state._in_node_step = False


def _store_owner(state: Any) -> Any:
    return getattr(state, "inner", state)  # L-GreCo keeps the per-parameter state in its inner state


def _layout(state: Any, bucket: Any, groups: NodeGroups) -> _Layout:
    """The bucket's cut (cached per bucket index); at a new layout, or after ``load_state_dict``,
    first hand each parameter's state to the local rank that owns it now (:func:`_hand_over`)."""
    from pycomm.hooks.hook_state import bucket_signature

    owner = _store_owner(state)
    layouts = owner.__dict__.setdefault("_node_layouts", {})
    buffer, params = bucket.buffer(), bucket.parameters()
    signature = bucket_signature(buffer, params)
    layout = layouts.get(bucket.index())
    if layout is not None and layout.signature == signature:
        return layout
    bounds = shard_cut([p.numel() for p in params], groups.per_node)
    offsets = list(itertools.accumulate((p.numel() for p in params), initial=0))
    spans = [(offsets[a], offsets[b] - offsets[a]) for a, b in bounds]
    layout = _Layout(signature, bounds, spans, max(1, max(n for _, n in spans)))
    _hand_over(state, bucket.index(), params, layout, groups)
    layouts[bucket.index()] = layout
    return layout


def _hand_over(state: Any, index: int, params: list[torch.Tensor], layout: _Layout, groups: NodeGroups) -> None:
    """Move the per-parameter state of the bucket's parameters to their owner under ``layout``: one
    all-reduce (sum) inside the node of what each rank holds, zeros elsewhere, plus one presence
    flag per parameter and kind of state; the owner keeps its parameters' state (loose, for the
    hook's next plan to take), the others drop theirs."""
    owner = _store_owner(state)
    names = owner._require_names().names_of(params)
    fields = [k for k, on in owner._fields().items() if on]
    accumulators = getattr(state, "_accumulators", None)  # L-GreCo's window, by parameter name
    kinds = len(fields) + (accumulators is not None)
    if not kinds:
        return
    numel = sum(p.numel() for p in params)
    device = params[0].device if params else torch.device("cpu")
    values = torch.zeros(kinds * numel + 2 * len(names), dtype=torch.float32, device=device)
    presence = values[kinds * numel:].view(2, len(names))
    held = owner._store.take(names)
    # The plan of this bucket index is rebuilt from what the owner receives, even where this
    # rank's shard kept its parameters (its values were just taken out of it).
    owner._plans.pop(index, None)
    offsets = list(itertools.accumulate((p.numel() for p in params), initial=0))
    for i, name in enumerate(names):
        o, n = offsets[i], params[i].numel()
        entry = held.get(name)
        if entry:
            presence[0, i] = 1.0
            for f, field in enumerate(fields):
                if field in entry:
                    values[f * numel + o:f * numel + o + n].copy_(entry[field].reshape(-1))
        if accumulators is not None and name in accumulators:
            presence[1, i] = 1.0
            values[len(fields) * numel + o:len(fields) * numel + o + n].copy_(accumulators.pop(name).reshape(-1))
    dist.all_reduce(values, group=groups.intra)
    present = presence.cpu()
    first, end = layout.bounds[groups.local_index]
    for i in range(first, end):
        name, o, n = names[i], offsets[i], params[i].numel()
        if present[0, i] > 0:
            owner._store.loose[name] = {field: values[f * numel + o:f * numel + o + n].clone()
                                        for f, field in enumerate(fields)}
        if accumulators is not None and present[1, i] > 0:
            accumulators[name] = values[len(fields) * numel + o:len(fields) * numel + o + n].clone()


def route(state: Any, bucket: Any, hook: Callable[[Any, Any], torch.futures.Future]) -> Optional[torch.futures.Future]:
    """In node mode, run ``hook`` (the method's hook itself, which then runs flat on a shard) through
    :func:`node_step` and return its future; None when the state runs flat (the caller goes on)."""
    groups = node_groups(state)
    return None if groups is None else node_step(state, bucket, groups, hook)


def node_step(state: Any, bucket: Any, groups: NodeGroups,
              flat_hook: Callable[[Any, Any], torch.futures.Future]) -> torch.futures.Future:
    """One bucket in node mode (see the module docstring): reduce-scatter inside the node, ``flat_hook``
    on this rank's shard among the inter-node group, all-gather inside the node. The future holds
    the bucket's buffer, the average over every rank, bit-identical on every rank."""
    layout = _layout(state, bucket, groups)
    buffer, params = bucket.buffer(), bucket.parameters()
    m, padded = groups.per_node, layout.padded
    packed = buffer.new_zeros(m * padded)
    for j, (o, n) in enumerate(layout.spans):
        packed[j * padded:j * padded + n].copy_(buffer[o:o + n])
    own = buffer.new_empty(padded)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # torch 2.13 renamed it
    reduce_scatter(own, packed, group=groups.intra)
    own.div_(m)
    first, end = layout.bounds[groups.local_index]
    own_length = layout.spans[groups.local_index][1]
    shard = own[:own_length]
    with _over_inter_group(state, groups):
        fut = flat_hook(state, _ShardBucket(shard, list(params[first:end]), bucket.index(), bucket.is_last()))
    # The shard's average must be there before this bucket's intra-node all-gather is issued: every
    # rank must issue the intra-node collectives of successive buckets in the same order, and a
    # callback would issue it later, from the collective's thread (Gloo), after the next bucket's
    # reduce-scatter. On CUDA the wait only orders the streams (NCCL), the host does not wait.
    result = fut.wait()
    result = result[0] if isinstance(result, (list, tuple)) else result
    if result.data_ptr() != shard.data_ptr():
        shard.copy_(result)
    everyone = buffer.new_empty(m * padded)
    work = all_gather_into_tensor(everyone, own, group=groups.intra, async_op=True)

    def put_back(_: torch.futures.Future) -> torch.Tensor:
        for j, (o, n) in enumerate(layout.spans):
            buffer[o:o + n].copy_(everyone[j * padded:j * padded + n])
        return buffer

    return work.get_future().then(put_back)

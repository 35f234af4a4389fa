"""Hierarchical compression: full precision inside a node, the method's compression between nodes.

With ``hierarchy="node"`` on N nodes of M ranks each, every hook runs one DDP bucket as:

1. **reduce-scatter inside the node**, uncompressed: the bucket's buffer is cut into M contiguous
   element ranges of about ``ceil(numel / M)`` elements (:func:`shard_spans`; a range may cut a
   parameter into pieces, at a multiple of the method's alignment from the parameter's start: 1,
   or quant's bucket size; the last ranges may be shorter or empty); local rank j receives the
   sum of range j over its node and divides it by M (the node's average gradient of its shard);
2. **the method's own (flat) algorithm on that shard**, among the N ranks that hold the same shard
   on the other nodes (the *inter-node group*): quantization, top-k, projection, with the state
   of the shard's pieces of parameters. Their result is identical on those N ranks and is the
   average over all W = N*M ranks;
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

Shards hold pieces of parameters: each hook plans its shard as a bucket of pieces, each layer an
entry ``(name, offset in the shard, length, offset in the parameter)``
(:func:`pycomm.hooks.hook_state.bucket_pieces`). Whether a piece is compressed is decided by its
whole parameter. What a piece draws and how it is cut follows its place in the parameter: quant's
stochastic rounding draws at (parameter, offset in the parameter) and a shard cuts a parameter only
at a multiple of the quantization bucket size from its start, so a piece quantizes in the buckets
of flat mode; spsa-projection draws each piece's directions at its elements' places in the model,
as in flat mode. Per-layer settings are per parameter and apply to each of its pieces, identically
on every rank that holds one: DGC keeps ``topk_count(piece length, the parameter's density)``
elements of each piece (per-piece top-k: the sum over a parameter's pieces is its flat count up to
rounding, one element per piece at most); L-GreCo measures each piece on the rank that holds it,
merges a parameter's rows inside the node (norms combined as the square root of the sum of
squares, bytes summed over its pieces, each sent as a layer of its own) and solves one setting per
parameter.

Per-parameter state (error feedback, DGC's u and v, L-GreCo's accumulated window) is kept per
parameter name, shaped like the parameter, on every local rank whose shard holds a piece of it,
and is zero outside that rank's piece: each rank's ``state_dict()`` has the format of flat mode
and holds the parameters its shard cuts, as they are among the N ranks of its inter-node group
(the pieces of one parameter on the M ranks of a node add up to its state). Save every rank's
state dict (:func:`pycomm.checkpoint.gather_state_dicts`) and load rank r's entry on rank r of a
run with the same nodes and ranks per node. When the cut changes (DDP rebuilds its buckets after
the first iteration, a resumed run starts from another bucket layout or another
``bucket_cap_mb``), the ranks of each node hand the state over once, at that layout change: each
contributes what it holds (zeros elsewhere) to one all-reduce inside the node, and each keeps the
part of its new piece. The sum is exact: at every element only one rank holds a non-zero value.

Why element ranges and not whole parameters: with runs of whole parameters a bucket holding one
big parameter (common: a large layer fills a DDP bucket alone) went whole to one local rank, the
others owned nothing, the intra-node collectives moved M times the bucket padded, and one rank per
node compressed everything. Equal element ranges give every local rank 1/M of every bucket to
compress and make the reduce-scatter and the all-gather move (M-1)/M of the bucket per rank each
way, with no padding when the ranges come out equal (M divides the bucket and, for quant, the cuts
fall on its bucket size; the collectives then work in the bucket's buffer). The bytes that cross
nodes do not depend on the cut. The price: a method's result may depend on where a parameter is cut
(DGC's per-piece top-k), so a resume whose first step runs under DDP's first bucket layout, cut
elsewhere, is exact only where the result does not depend on the cut (DGC at density 1, say); the
state itself is handed over exactly.

Costs besides the compressed payload: the intra-node reduce-scatter and all-gather of the bucket
(uncompressed, inside the node, padded to M equal ranges where they are not), the wait for the
shard's result before the all-gather (on CPU; on CUDA it only orders streams), at each layout change
one intra-node all-reduce of the bucket's state, and once, at ``bind``, one ``all_gather_object`` of
every rank's node.

Non-finite gradients: the intra-node sum carries a NaN/Inf into its shard, the method's flat path
handles it there as it does in flat mode (on CPU an uncompressed all-reduce of that shard among the
inter-node group; on CUDA a NaN shard), and the all-gather gives it to every rank of the node.
"""

from __future__ import annotations

import bisect
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
           "shard_spans"]

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
    spans: list[tuple[int, int]]   # per local rank: (offset, length) of its element range in the bucket buffer
    chunk: int                     # L: the longest range, the length of every shard in the intra-node collectives
    # per local rank: what its range holds of each parameter it cuts, as (index of the parameter in
    # the bucket, offset in the shard, length, offset in the parameter), in bucket order
    pieces: list[list[tuple[int, int, int, int]]]


def shard_spans(numels: list[int], parts: int, alignment: int = 1) -> list[tuple[int, int]]:
    """Cut a bucket of parameters of ``numels`` elements (bucket order) into ``parts`` contiguous
    element ranges of about ``ceil(total / parts)`` elements. A cut inside a parameter falls at a
    multiple of ``alignment`` from the parameter's start (the quantization hook's bucket size: the
    pieces of a parameter then quantize in the same buckets, and draw at the same places, as the
    whole parameter in flat mode), the nearest to its target ``j * ceil(total / parts)``; with
    ``alignment`` 1 every range but the last ones has exactly that length. Ranges may be empty.
    Returns ``(offset, length)`` per range."""
    prefix = list(itertools.accumulate(numels, initial=0))
    total = prefix[-1]
    chunk = -(-total // parts)
    cuts = [0]
    for j in range(1, parts):
        target = min(j * chunk, total)
        i = bisect.bisect_right(prefix, target) - 1  # the parameter that holds element `target`
        cut = target
        if i < len(numels) and prefix[i] < target:
            cut = min(prefix[i] + alignment * round((target - prefix[i]) / alignment), prefix[i + 1])
        cuts.append(max(cuts[-1], cut))
    cuts.append(total)
    return [(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]


def _pieces_in(numels: list[int], span: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The pieces of the parameters of ``numels`` (bucket order) that the element range ``span`` holds:
    ``(parameter index, offset in the range, length, offset in the parameter)``, empty ones left out."""
    first, length = span
    pieces = []
    offset = 0
    for i, n in enumerate(numels):
        lo, hi = max(offset, first), min(offset + n, first + length)
        if hi > lo:
            pieces.append((i, lo - first, hi - lo, lo - offset))
        offset += n
    return pieces


class _ShardBucket:
    """What a hook reads of a ``dist.GradBucket``, for this rank's shard of a bucket: its buffer is
    the shard, and :meth:`pieces` says what it holds of each parameter (read by
    :func:`pycomm.hooks.hook_state.bucket_pieces`)."""

    def __init__(self, buffer: torch.Tensor, pieces: list[tuple[torch.Tensor, int, int, int]], index: int,
                 last: bool) -> None:
        self._buffer, self._pieces, self._index, self._last = buffer, pieces, index, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return [p for p, _, _, _ in self._pieces]

    def pieces(self) -> list[tuple[torch.Tensor, int, int, int]]:
        """``(parameter, offset in the shard, length, offset in the parameter)`` in shard order."""
        return self._pieces

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
    numels = [p.numel() for p in params]
    spans = shard_spans(numels, groups.per_node, owner._shard_alignment())
    layout = _Layout(signature, spans, max(1, max(n for _, n in spans)), [_pieces_in(numels, span) for span in spans])
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
    for i, _, length, start in layout.pieces[groups.local_index]:
        name, o, n = names[i], offsets[i], params[i].numel()
        if present[0, i] > 0:
            owner._store.loose[name] = {field: _own_piece(values[f * numel + o:f * numel + o + n], start, length)
                                        for f, field in enumerate(fields)}
        if accumulators is not None and present[1, i] > 0:
            accumulators[name] = _own_piece(values[len(fields) * numel + o:len(fields) * numel + o + n], start, length)


def _own_piece(full: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """A parameter's state, kept for the piece ``[start, start + length)`` this rank's shard holds and
    zero elsewhere (the other local ranks keep the rest): sums inside the node stay exact."""
    if start == 0 and length == full.numel():
        return full.clone()
    out = torch.zeros_like(full)
    out[start:start + length].copy_(full[start:start + length])
    return out


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
    m, chunk = groups.per_node, layout.chunk
    # Equal ranges (the usual case): the collectives read and write the bucket's buffer itself.
    exact = all(o == j * chunk and n == chunk for j, (o, n) in enumerate(layout.spans))
    packed = buffer
    if not exact:
        packed = buffer.new_zeros(m * chunk)
        for j, (o, n) in enumerate(layout.spans):
            packed[j * chunk:j * chunk + n].copy_(buffer[o:o + n])
    own = buffer.new_empty(chunk)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # torch 2.13 renamed it
    reduce_scatter(own, packed, group=groups.intra)
    own.div_(m)
    shard = own[:layout.spans[groups.local_index][1]]
    pieces = [(params[i], o, n, start) for i, o, n, start in layout.pieces[groups.local_index]]
    with _over_inter_group(state, groups):
        fut = flat_hook(state, _ShardBucket(shard, pieces, bucket.index(), bucket.is_last()))
    # The shard's average must be there before this bucket's intra-node all-gather is issued: every
    # rank must issue the intra-node collectives of successive buckets in the same order, and a
    # callback would issue it later, from the collective's thread (Gloo), after the next bucket's
    # reduce-scatter. On CUDA the wait only orders the streams (NCCL), the host does not wait.
    result = fut.wait()
    result = result[0] if isinstance(result, (list, tuple)) else result
    if result.data_ptr() != shard.data_ptr():
        shard.copy_(result)
    everyone = buffer if exact else buffer.new_empty(m * chunk)
    work = all_gather_into_tensor(everyone, own, group=groups.intra, async_op=True)

    def put_back(_: torch.futures.Future) -> torch.Tensor:
        if not exact:
            for j, (o, n) in enumerate(layout.spans):
                buffer[o:o + n].copy_(everyone[j * chunk:j * chunk + n])
        return buffer

    return work.get_future().then(put_back)

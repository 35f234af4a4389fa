"""Which ranks of a process group share a node: the input of hierarchical compression.

A rank's node is read from torchrun's environment when it is there (``GROUP_RANK``: the node's
index, with ``LOCAL_WORLD_SIZE``: the ranks torchrun started on it), otherwise from the host name
(``socket.gethostname()``). The ranks exchange what they found with one ``all_gather_object``
(:func:`discover`), so every rank computes the same :class:`NodeMap` from the same list; what
cannot be right (a mix of torchrun and host-name keys, more ranks claiming a node than torchrun
started there) raises the same :class:`TopologyError` on every rank.

Example::

    nodes = pycomm.topology.discover()      # a collective: call it on every rank
    print(nodes.ranks_per_node, nodes.local_index(dist.get_rank()))
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

__all__ = ["NodeMap", "TopologyError", "node_key", "discover"]


class TopologyError(ValueError):
    """The ranks' descriptions of their nodes do not fit together (raised on every rank)."""


def node_key(env: Optional[dict[str, str]] = None) -> tuple:
    """This process's node: ``("torchrun", GROUP_RANK, LOCAL_WORLD_SIZE)`` under torchrun, else
    ``("host", hostname)``. ``env`` (default ``os.environ``) is for tests."""
    env = os.environ if env is None else env
    if "GROUP_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        try:
            return ("torchrun", int(env["GROUP_RANK"]), int(env["LOCAL_WORLD_SIZE"]))
        except ValueError as e:
            raise TopologyError(f"GROUP_RANK={env['GROUP_RANK']!r} and LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']!r} "
                                "must be integers (torchrun sets them)") from e
    return ("host", socket.gethostname())


@dataclass(frozen=True)
class NodeMap:
    """The nodes of a process group: ``nodes[i]`` lists the group ranks on node i, ascending; the
    nodes are ordered by their lowest rank. A rank's local index is its position in its node's list."""

    nodes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_keys(cls, keys: list[tuple]) -> "NodeMap":
        """Group ranks ``0..len(keys)-1`` by their :func:`node_key` (checked, see :func:`discover`)."""
        kinds = sorted({str(key[0]) for key in keys})
        if len(kinds) > 1:
            raise TopologyError(f"some ranks found their node from torchrun's environment and others from their host "
                                f"name ({', '.join(f'rank {r}: {k}' for r, k in enumerate(keys))}); launch every "
                                "rank the same way")
        by_node: dict[Any, list[int]] = {}
        for rank, key in enumerate(keys):
            by_node.setdefault(key[1], []).append(rank)
        if kinds == ["torchrun"]:
            for node, ranks in by_node.items():
                declared = {keys[r][2] for r in ranks}
                if len(declared) > 1 or len(ranks) > max(declared):
                    raise TopologyError(f"node GROUP_RANK={node} has ranks {ranks} in this group, but they report "
                                        f"LOCAL_WORLD_SIZE {sorted(declared)}; the environment does not describe "
                                        "the launch")
        return cls(tuple(tuple(ranks) for ranks in sorted(by_node.values())))

    @property
    def world_size(self) -> int:
        return sum(len(ranks) for ranks in self.nodes)

    @property
    def ranks_per_node(self) -> Optional[int]:
        """M when every node has the same number of ranks, else None."""
        sizes = {len(ranks) for ranks in self.nodes}
        return sizes.pop() if len(sizes) == 1 else None

    def node_of(self, rank: int) -> int:
        return next(i for i, ranks in enumerate(self.nodes) if rank in ranks)

    def local_index(self, rank: int) -> int:
        return self.nodes[self.node_of(rank)].index(rank)

    def describe(self) -> str:
        return f"{len(self.nodes)} node(s) with ranks " + ", ".join(str(list(ranks)) for ranks in self.nodes)


def discover(group: Optional[dist.ProcessGroup] = None, extra: Any = None) -> tuple[NodeMap, list[Any]]:
    """Exchange every rank's :func:`node_key` (and ``extra``, e.g. a setting the ranks must share)
    with one ``all_gather_object`` over ``group``; return the :class:`NodeMap` and every rank's
    ``extra``, in group-rank order. A collective: call it on every rank of ``group`` at the same point.

    Raises:
        TopologyError: on every rank, when the keys do not fit together.
    """
    own = (node_key(), extra)
    if not (dist.is_available() and dist.is_initialized()):
        return NodeMap.from_keys([own[0]]), [extra]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, own, group=group)
    return NodeMap.from_keys([key for key, _ in everyone]), [e for _, e in everyone]

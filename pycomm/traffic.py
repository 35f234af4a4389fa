"""Count the bytes that collectives send, at the process-group level.

:class:`CollectiveByteCounter` wraps the ``torch.distributed`` collectives
while it is active and adds up, for this rank, the bytes that each call puts on
the network under the usual bandwidth-optimal algorithms (ring all-reduce,
ring all-gather, pairwise all-to-all). The figure comes from the tensors that
are really passed to the collectives, whichever hook calls them (pycomm's or
PyTorch's built-in ones), so compressed and uncompressed methods are measured
the same way.

Per call on a group of W ranks, with ``b`` the bytes of the input tensor:

============================== ======================================
collective                      bytes sent by this rank
============================== ======================================
``all_reduce``                  ``2 * (W - 1) / W * b``
``reduce_scatter_tensor``       ``(W - 1) / W * b``
``reduce_scatter_single``       ``(W - 1) / W * b``
``all_gather(_into_tensor)``    ``(W - 1) * b``
``all_to_all_single``           the input rows addressed to other ranks
``broadcast``                   ``b`` on the source rank, else 0
============================== ======================================

DDP's built-in all-reduce (no hook registered) runs in C++ and is not seen;
register ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook``
to measure it.

Example::

    with CollectiveByteCounter() as counter:
        loss.backward()
    print(counter.bytes_sent, counter.calls)
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["CollectiveByteCounter", "collective_bytes"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _world(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group)


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(group)


def _all_to_all_single_bytes(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **_):
    world = _world(group)
    if input.numel() == 0:
        return 0
    if not input_split_sizes:
        return _nbytes(input) * (world - 1) // world
    row_bytes = _nbytes(input) // max(input.shape[0], 1)
    me = _rank(group)
    return row_bytes * sum(s for r, s in enumerate(input_split_sizes) if r != me)


def _broadcast_bytes(tensor, src=None, group=None, **kwargs):
    group_src = kwargs.get("group_src")
    me_global = dist.get_rank()
    if group_src is not None:
        return _nbytes(tensor) if _rank(group) == group_src else 0
    return _nbytes(tensor) if me_global == src else 0


# collective name -> function(*args, **kwargs) giving the bytes this rank sends
_VOLUME: dict[str, Callable[..., int]] = {
    "all_reduce": lambda tensor, op=None, group=None, **_: 2 * (_world(group) - 1) * _nbytes(tensor) // _world(group),
    "reduce_scatter_tensor": lambda output, input, op=None, group=None, **_: (_world(group) - 1) * _nbytes(input) // _world(group),
    "reduce_scatter_single": lambda output, input, op=None, group=None, **_: (_world(group) - 1) * _nbytes(input) // _world(group),
    "all_gather_into_tensor": lambda output_tensor, input_tensor, group=None, **_: (_world(group) - 1) * _nbytes(input_tensor),
    "all_gather_single": lambda output_tensor, input_tensor, group=None, **_: (_world(group) - 1) * _nbytes(input_tensor),
    "all_gather": lambda tensor_list, tensor, group=None, **_: (_world(group) - 1) * _nbytes(tensor),
    "all_to_all_single": _all_to_all_single_bytes,
    "broadcast": _broadcast_bytes,
}


def _group_ranks(signature: Optional[inspect.Signature], args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The global ranks of the group a collective call runs on (``signature``: the collective's, read once
    when it is wrapped; None where it has none, and then only a ``group=`` keyword is seen)."""
    group = kwargs.get("group")
    if signature is not None:
        try:
            group = signature.bind_partial(*args, **kwargs).arguments.get("group")
        except TypeError:
            pass
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def collective_bytes(name: str, *args: Any, **kwargs: Any) -> int:
    """Bytes this rank sends for one call of collective ``name`` (see the table above)."""
    return int(_VOLUME[name](*args, **kwargs))


class CollectiveByteCounter:
    """Context manager that counts the bytes this rank's collectives send.

    Attributes:
        bytes_sent: total bytes sent by this rank while active.
        calls: a :class:`collections.Counter` of collective names.
        bytes_by_collective: a :class:`collections.Counter` of bytes per name.
        bytes_by_group: a :class:`collections.Counter` of bytes per process group, keyed by the
            group's global ranks (a tuple; the default group's too): e.g. the bytes of hierarchical
            compression's inter-node group apart from those that stay inside a node.

    Counters can be reset with :meth:`reset` and the context re-entered.
    Nesting two counters is not supported.
    """

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls: Counter[str] = Counter()
        self.bytes_by_collective: Counter[str] = Counter()
        self.bytes_by_group: Counter[tuple[int, ...]] = Counter()
        self._originals: dict[str, Callable[..., Any]] = {}

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls.clear()
        self.bytes_by_collective.clear()
        self.bytes_by_group.clear()

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        try:
            signature: Optional[inspect.Signature] = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            sent = collective_bytes(name, *args, **kwargs)
            self.bytes_sent += sent
            self.bytes_by_collective[name] += sent
            self.bytes_by_group[_group_ranks(signature, args, kwargs)] += sent
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> "CollectiveByteCounter":
        if self._originals:
            raise RuntimeError("CollectiveByteCounter is already active")
        for name in _VOLUME:
            original = getattr(dist, name, None)
            if original is None:  # e.g. all_gather_single before torch 2.13
                continue
            if getattr(original, "_pycomm_counted", False):
                raise RuntimeError("another CollectiveByteCounter is already active")
            wrapped = self._wrap(name, original)
            wrapped._pycomm_counted = True  # type: ignore[attr-defined]
            self._originals[name] = original
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

"""The spine every pycomm hook stands on: the state's base class (pickling, the configuration in
``state_dict``), the step counter, the split of a bucket into compressed and dense layers, the
layer-key check, the dense side channel and completed futures. Each hook file keeps only its method."""

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.distributed as dist

from pycomm.distributed import completed_future  # the one completed future, shared with the collectives

__all__ = ["HookState", "BucketPlan", "LayerKey", "Layer", "Dense", "advance_step", "bucket_signature",
           "split_layers", "validated_layer_key", "validated_layer_params", "take_dense", "allreduce_dense",
           "put_dense", "average_", "average_async", "completed_future"]

LayerKey = tuple[int, int]      # (DDP bucket index, position of the parameter in bucket.parameters())
Layer = tuple[int, int, int]    # a compressed layer: (position, offset, length) in the bucket buffer
Dense = tuple[int, int]         # a layer all-reduced uncompressed: (offset, length)


@dataclass
class BucketPlan:
    """What a hook prepared for one DDP bucket's layout; each hook extends it with its own fields."""

    signature: tuple      # the buffer's layout (bucket_signature): the plan is rebuilt when it changes
    layers: list[Layer]   # compressed layers: (position, offset, length)
    dense: list[Dense]    # layers all-reduced uncompressed: (offset, length)


class HookState:
    """The base of pycomm's hook states.

    Pickling drops ``process_group`` (a process group cannot be pickled) and ``observer``
    (a callable of the running job, e.g. L-GreCo's accumulator, often not picklable); after
    unpickling the group is None, the default group, as in PyTorch's PowerSGDState, and the
    observer is None. Attributes named in ``_UNPICKLE_DEFAULTS`` that a pickle lacks (written
    before they existed, or in ``_NOT_PICKLED``) are created by their factory.

    ``_CONFIG`` names the plain settings that :meth:`_config_state` writes into a state dict and
    :meth:`_load_config` reads back.
    """

    process_group: Any = None
    observer: Optional[Callable[..., None]] = None
    _NOT_PICKLED: tuple[str, ...] = ("process_group", "observer", "_settings_agreed")  # ranks check again after loading
    _UNPICKLE_DEFAULTS: Mapping[str, Callable[[], Any]] = {}  # replaced by subclasses, never mutated
    _CONFIG: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self.observer = None
        for name, factory in self._UNPICKLE_DEFAULTS.items():
            if name not in self.__dict__:
                self.__dict__[name] = factory()

    def _config_state(self) -> dict[str, Any]:
        """The ``_CONFIG`` settings, as written at the top of :meth:`state_dict`."""
        return {k: getattr(self, k) for k in self._CONFIG}

    def _load_config(self, state_dict: dict[str, Any]) -> None:
        """Set the ``_CONFIG`` settings from a state dict (each one must be there)."""
        for k in self._CONFIG:
            setattr(self, k, state_dict[k])


def advance_step(state: Any, bucket: dist.GradBucket) -> int:
    """The step ``bucket`` belongs to (``state.iter`` before this call); the last bucket of a
    backward pass advances ``state.iter``, so every bucket of one step sees the same number."""
    step = state.iter
    if bucket.is_last():
        state.iter += 1
    return step


def bucket_signature(buffer: torch.Tensor, params: Iterable[torch.Tensor]) -> tuple:
    """The layout a plan is built for: (numel, dtype, parameter shapes)."""
    return (buffer.numel(), buffer.dtype, tuple(tuple(p.shape) for p in params))


def split_layers(params: Iterable[torch.Tensor], min_numel: int) -> tuple[list[Layer], list[Dense]]:
    """Split a bucket's parameters, in buffer order, into compressed layers ``(position, offset,
    length)`` (``dim > 1`` and at least ``min_numel`` elements) and dense ones ``(offset, length)``
    (the rest, empty parameters left out)."""
    layers: list[Layer] = []
    dense: list[Dense] = []
    offset = 0
    for position, p in enumerate(params):
        n = p.numel()
        if p.dim() > 1 and n >= min_numel:
            layers.append((position, offset, n))
        elif n:
            dense.append((offset, n))
        offset += n
    return layers, dense


def validated_layer_key(key: Any) -> LayerKey:
    """A per-layer settings key as ``(bucket_index, position)`` of plain ints.

    Raises:
        ValueError: unless ``key`` is a pair of non-negative integers (bools are not integers here).
    """
    if (not isinstance(key, tuple) or len(key) != 2
            or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in key)):
        raise ValueError(f"layer keys must be (bucket_index, position) pairs of non-negative ints, got {key!r}")
    return int(key[0]), int(key[1])


_Setting = TypeVar("_Setting")


def validated_layer_params(params: Optional[Mapping[Any, Any]], what: str,
                           validated_value: Callable[[LayerKey, Any], _Setting]) -> dict[LayerKey, _Setting]:
    """A ``set_layer_params`` mapping ``{(bucket_index, position): setting}`` with checked keys and
    each value passed through ``validated_value(key, value)`` (which raises ValueError); None: ``{}``.

    Raises:
        ValueError: ``params`` is not a mapping, or a key or value is malformed.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(f"layer params must be a dict {{(bucket_index, position): {what}}} or None, "
                         f"got {type(params).__name__}")
    return {validated_layer_key(key): validated_value(key, value) for key, value in params.items()}


def take_dense(buffer: torch.Tensor, dense: list[Dense]) -> Optional[torch.Tensor]:
    """A copy of the dense layers' elements, concatenated (None: no dense layer). Taken before the
    compressed path writes the buffer."""
    return torch.cat([buffer[o:o + n] for o, n in dense]) if dense else None


def allreduce_dense(buffer: torch.Tensor, dense: list[Dense], small: torch.Tensor,
                    group: Optional[dist.ProcessGroup], world: int,
                    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
    """The dense side channel: all-reduce ``small`` (from :func:`take_dense`), divide by ``world``,
    optionally map the average through ``transform`` (DGC's local momentum), and copy it back to
    the dense layers of ``buffer``. Blocking, on the caller's stream: the copy-back happens before
    the hook returns, never in a future's callback (whose stream would not wait for this all-reduce,
    and which would free ``small`` without ``record_stream``)."""
    average_(small, group, world)
    put_dense(buffer, dense, small if transform is None else transform(small))


def put_dense(buffer: torch.Tensor, dense: list[Dense], values: torch.Tensor) -> None:
    """Copy ``values`` (laid out as :func:`take_dense` returns them) back to the dense layers of ``buffer``."""
    start = 0
    for o, n in dense:
        buffer[o:o + n].copy_(values[start:start + n])
        start += n


def average_async(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.futures.Future:
    """All-reduce ``tensor`` in place and divide it by the group's size in the future's callback: the
    plain path of a bucket that is not compressed."""
    world = dist.get_world_size(group)
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))


def average_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup], world: int) -> torch.Tensor:
    """All-reduce ``tensor`` in place and divide it by ``world``, before returning (blocking)."""
    dist.all_reduce(tensor, group=group)
    return tensor.div_(world)

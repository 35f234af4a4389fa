"""The spine every pycomm hook stands on: the state's base class (parameter names, pickling, the
common part of ``state_dict``), the step counter, the split of a bucket into compressed and dense
layers, the layer-key check, the dense side channel and completed futures. Each hook file keeps
only its method."""

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.distributed as dist

from pycomm.distributed import completed_future  # the one completed future, shared with the collectives
from pycomm.hooks.param_state import (STATE_FORMAT, CheckpointMismatch, ParameterNames, ParamsLike, ParamStore,
                                      check_header, param_tensors_for_load, report_mismatch)

__all__ = ["HookState", "BucketPlan", "LayerKey", "Layer", "Dense", "advance_step", "split_layers",
           "validated_layer_key", "validated_layer_params", "Piece", "bucket_pieces", "plan_signature", "split_pieces",
           "piece_slices", "take_dense", "allreduce_dense", "put_dense", "average_",
           "average_async", "completed_future"]

LayerKey = str                  # a parameter's name in the model (``model.named_parameters()``)
# A compressed layer, or the piece of one that a bucket (in node mode: this rank's shard of a bucket,
# see pycomm.hooks.hierarchy) holds: (name, offset in the bucket buffer, length, offset in the parameter).
# In flat mode every layer is whole: offset in the parameter 0, length its numel.
Layer = tuple[str, int, int, int]
Dense = tuple[int, int]         # a layer all-reduced uncompressed: (offset, length)
# What a bucket holds of one parameter: (parameter, offset in the bucket buffer, length, offset in the parameter).
Piece = tuple[torch.Tensor, int, int, int]


@dataclass
class BucketPlan:
    """What a hook prepared for one DDP bucket's layout; each hook extends it with its own fields."""

    signature: tuple      # the bucket's layout (:func:`bucket_signature`): the plan is rebuilt when it changes
    names: list[str]      # the bucket's parameters' names, in buffer order
    layers: list[Layer]   # compressed layers: (name, offset, length, offset in the parameter)
    dense: list[Dense]    # layers all-reduced uncompressed: (offset, length)


class HookState:
    """The base of pycomm's hook states.

    State belongs to parameters (see :mod:`pycomm.hooks.param_state`): a state needs the names of
    the model's parameters, given by :meth:`bind` (``pycomm.register`` calls it). A hook whose
    state was never bound raises ``ValueError`` at its first call.

    Pickling drops ``process_group`` (a process group cannot be pickled), ``observer`` (a callable
    of the running job, often not picklable) and the bound names (bind again after unpickling);
    after unpickling the group is None, the default group, as in PyTorch's PowerSGDState. For
    checkpoints use :meth:`state_dict`, which holds only tensors, numbers, strings, lists and
    dicts (it loads with ``torch.load(weights_only=True)``).

    ``_CONFIG`` names the settings written into a state dict's ``config`` and compared on loading;
    ``_METHOD`` is the method's registry name, also written there.
    """

    process_group: Any = None
    observer: Optional[Callable[..., None]] = None
    _names: Optional[ParameterNames] = None
    hierarchy: str = "flat"   # set by each state's constructor (see pycomm.hooks.hierarchy)
    _NOT_PICKLED: tuple[str, ...] = ("process_group", "observer", "_settings_agreed", "_names", "_node_groups",
                                     "_resolved", "_in_node_step", "_node_layouts")
    _UNPICKLE_DEFAULTS: Mapping[str, Callable[[], Any]] = {}  # replaced by subclasses, never mutated
    _CONFIG: tuple[str, ...] = ()
    _METHOD: str = ""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self.observer = None
        for name, factory in self._UNPICKLE_DEFAULTS.items():
            if name not in self.__dict__:
                self.__dict__[name] = factory()

    # -- parameter names -------------------------------------------------------------
    def bind(self, model: ParamsLike) -> "HookState":
        """Give the state the names of the model's parameters, which key its per-parameter state.

        Args:
            model: the DDP model the hook is registered on (its ``.module``'s parameter names are
                used, as in the model's own ``state_dict``), or an ``nn.Module``, a ``{name: tensor}``
                mapping or ``(name, tensor)`` pairs holding the same parameter tensors.

        Returns:
            The state itself. Call it before the first backward; ``pycomm.register`` does.

        Raises:
            ValueError: no parameters, a duplicate name, or (after ``load_state_dict`` with
                ``strict=True``) a loaded name or shape the model does not have.
        """
        self._names = ParameterNames(model)
        self._check_bound()
        self._settle_hierarchy()
        return self

    def _settle_hierarchy(self) -> None:
        """Resolve ``hierarchy`` now if the process group exists (a collective: ``bind`` runs on every
        rank); otherwise the first hook call does. Not for a state nested in another (L-GreCo's)."""
        if not getattr(self, "_nested", False) and dist.is_available() and dist.is_initialized():
            from pycomm.hooks import hierarchy
            hierarchy.settle(self)

    def _check_bound(self) -> None:
        """Check what was loaded before :meth:`bind` against the names (subclasses add their settings)."""
        self._store.loose = param_tensors_for_load(self._store.loose, self._names, self._fields(), True, [])

    # -- per-parameter state ---------------------------------------------------------------
    _store: ParamStore
    _plans: dict

    def _shard_alignment(self) -> int:
        """Node mode (:mod:`pycomm.hooks.hierarchy`): a shard may cut a parameter only at a multiple of
        this many elements from the parameter's start (1: anywhere)."""
        return 1

    def _fields(self) -> dict[str, bool]:
        """The per-parameter tensors the method keeps now, by field name (e.g. ``{"u": True, "v": True}``)."""
        return {}

    def _params_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's state by name, each tensor shaped like its parameter (for ``state_dict``)."""
        params = self._store.everything()
        if self._names is None:
            return params
        shapes = self._names.params
        return {name: {k: t.reshape(shapes[name].shape) for k, t in fields.items()}
                for name, fields in params.items() if name in shapes}

    def _load_params(self, state_dict: Mapping[str, Any], strict: bool, skipped: list[str]) -> None:
        """Drop the plans and the current per-parameter state and keep the checkpoint's, checked, until
        the hook's next call puts each parameter's part into its bucket."""
        self._plans.clear()
        self._store.clear()
        self.__dict__.pop("_node_layouts", None)  # node mode: hand the loaded state to its owners again
        self._store.loose = param_tensors_for_load(state_dict.get("params", {}), self._names, self._fields(), strict,
                                                   skipped)

    @property
    def parameter_names(self) -> Optional[ParameterNames]:
        """The bound names (None before :meth:`bind`)."""
        return self._names

    def _require_names(self) -> ParameterNames:
        if self._names is None:
            raise ValueError(f"{type(self).__name__} was not bound to a model: its state is kept per parameter "
                             f"name. Register it with pycomm.register(ddp_model, {self._METHOD!r}, ...), or call "
                             "state.bind(ddp_model) before the first backward")
        return self._names

    # -- state dicts ---------------------------------------------------------------------
    def _config_state(self) -> dict[str, Any]:
        """The ``_CONFIG`` settings, as written into :meth:`state_dict`'s ``config``."""
        return {k: getattr(self, k) for k in self._CONFIG}

    def _header(self) -> dict[str, Any]:
        """The part of every state dict that is not per parameter."""
        group = self.process_group
        initialized = dist.is_available() and dist.is_initialized()
        return {"method": self._METHOD, "format": STATE_FORMAT, "config": self._config_state(),
                "step": int(self.iter),
                "rank": dist.get_rank(group) if initialized else 0,
                "world_size": dist.get_world_size(group) if initialized else 1,
                "hierarchy": self._hierarchy_header()}

    def _hierarchy_header(self) -> dict[str, Any]:
        """How the state was resolved: ``mode`` ("flat" or "node", see :mod:`pycomm.hooks.hierarchy`)
        and, in node mode, ``nodes`` and ``ranks_per_node``; per-parameter state in node mode is
        the shard's, so a checkpoint only fits a run resolved the same way."""
        groups = getattr(self, "_node_groups", None)
        if groups is None:
            return {"mode": "flat"}
        return {"mode": "node", "nodes": groups.nodes, "ranks_per_node": groups.per_node}

    def _read_header(self, state_dict: Any, strict: bool, skipped: list[str]) -> None:
        """Check the method, format and settings of ``state_dict`` and take its step."""
        check_header(state_dict, self._METHOD, self._config_state(), strict, skipped)
        if "_resolved" in self.__dict__ and not getattr(self, "_nested", False):
            saved = state_dict.get("hierarchy") or {"mode": "flat"}  # written since hierarchical compression
            if saved != self._hierarchy_header():
                report_mismatch(strict, f"the checkpoint's per-parameter state was made with hierarchy {saved}, "
                                        f"this state runs {self._hierarchy_header()}", skipped)
        step = state_dict.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointMismatch(f"the checkpoint's step must be an int >= 0, got {step!r}")
        self.iter = step


def advance_step(state: Any, bucket: dist.GradBucket) -> int:
    """The step ``bucket`` belongs to (``state.iter`` before this call); the last bucket of a
    backward pass advances ``state.iter``, so every bucket of one step sees the same number."""
    step = state.iter
    if bucket.is_last():
        state.iter += 1
    return step


def bucket_signature(buffer: torch.Tensor, params: list[torch.Tensor]) -> tuple:
    """The layout a plan is built for: (numel, dtype, the parameters' identities). Identities, not
    shapes: two buckets whose equal-shaped parameters swapped places have different state."""
    return (buffer.numel(), buffer.dtype, tuple(id(p) for p in params))


def bucket_pieces(bucket: Any) -> list[Piece]:
    """What ``bucket`` holds of each parameter, in buffer order: every parameter whole for a DDP bucket;
    in node mode, for this rank's shard of a bucket, the pieces of the parameters it cuts (see
    :mod:`pycomm.hooks.hierarchy`; the shard bucket offers them as ``pieces()``)."""
    pieces = getattr(bucket, "pieces", None)
    if pieces is not None:
        return pieces()
    out: list[Piece] = []
    offset = 0
    for p in bucket.parameters():
        out.append((p, offset, p.numel(), 0))
        offset += p.numel()
    return out


def plan_signature(bucket: Any) -> tuple:
    """The layout a plan is built for: :func:`bucket_signature` with each piece's place in its
    parameter (two shards may hold the same parameters cut elsewhere)."""
    buffer = bucket.buffer()
    return (buffer.numel(), buffer.dtype, tuple((id(p), start, n) for p, _, n, start in bucket_pieces(bucket)))


def same_layout_plan(state: HookState, bucket: dist.GradBucket) -> tuple[Any, tuple]:
    """The state's plan for ``bucket`` if it was built for the bucket's current layout (else None), and
    that layout's :func:`plan_signature`."""
    signature = plan_signature(bucket)
    plan = state._plans.get(bucket.index())
    return (plan if plan is not None and plan.signature == signature else None), signature


def parameter_slices(names: list[str], params: list[torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Each parameter's ``(offset, length)`` in its bucket's buffer, by name."""
    offsets = itertools.accumulate((p.numel() for p in params[:-1]), initial=0)
    return {name: (offset, p.numel()) for name, p, offset in zip(names, params, offsets)}


def piece_slices(names: list[str], pieces: list[Piece]) -> dict[str, tuple[int, int, int, int]]:
    """Each piece's ``(offset in the buffer, length, offset in the parameter, numel of the parameter)``
    by parameter name (a bucket holds at most one piece of a parameter), as
    :func:`pycomm.hooks.param_state.export_slices` takes them."""
    return {name: (o, n, start, p.numel()) for name, (p, o, n, start) in zip(names, pieces)}


def split_layers(params: Iterable[torch.Tensor], names: list[str], min_numel: int) -> tuple[list[Layer], list[Dense]]:
    """Split a bucket's parameters, in buffer order, into compressed layers ``(name, offset, length, 0)``
    (``dim > 1`` and at least ``min_numel`` elements) and dense ones ``(offset, length)`` (the rest,
    empty parameters left out)."""
    pieces: list[Piece] = []
    offset = 0
    for p in params:
        pieces.append((p, offset, p.numel(), 0))
        offset += p.numel()
    return split_pieces(pieces, names, min_numel)


def split_pieces(pieces: list[Piece], names: list[str], min_numel: int) -> tuple[list[Layer], list[Dense]]:
    """:func:`split_layers` for pieces of parameters (:func:`bucket_pieces`): whether a piece is
    compressed is decided by its whole parameter, so every piece of a parameter is treated alike."""
    layers: list[Layer] = []
    dense: list[Dense] = []
    for name, (p, offset, n, start) in zip(names, pieces):
        if compressible(p, min_numel):
            layers.append((name, offset, n, start))
        elif n:
            dense.append((offset, n))
    return layers, dense


def compressible(p: torch.Tensor, min_numel: int) -> bool:
    """Whether a hook compresses parameter ``p`` (``dim > 1`` and at least ``min_numel`` elements)."""
    return p.dim() > 1 and p.numel() >= min_numel


def validated_layer_key(key: Any, names: Optional[ParameterNames] = None) -> LayerKey:
    """A per-layer settings key: a parameter name (as in ``model.named_parameters()``).

    Raises:
        ValueError: ``key`` is not a string, or the state is bound and the model has no such parameter.
    """
    if not isinstance(key, str):
        raise ValueError(f"layer keys must be parameter names (str, as in model.named_parameters()), got {key!r}")
    if names is not None and key not in names.params:
        raise ValueError(f"no parameter is named {key!r} in the bound model")
    return key


_Setting = TypeVar("_Setting")


def validated_layer_params(params: Optional[Mapping[Any, Any]], what: str,
                           validated_value: Callable[[LayerKey, Any], _Setting],
                           names: Optional[ParameterNames] = None) -> dict[LayerKey, _Setting]:
    """A ``set_layer_params`` mapping ``{parameter name: setting}`` with checked keys (known names
    when ``names`` is given) and each value passed through ``validated_value(key, value)`` (which
    raises ValueError); None: ``{}``.

    Raises:
        ValueError: ``params`` is not a mapping, or a key or value is malformed.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(f"layer params must be a dict {{parameter name: {what}}} or None, got {type(params).__name__}")
    return {validated_layer_key(key, names): validated_value(key, value) for key, value in params.items()}


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

"""State that belongs to parameters: every hook keys its per-element state by the parameter's name.

A DDP bucket is not a stable identity: DDP lays its first buckets out in model order and rebuilds
them after the first iteration (and a resumed run starts from the first layout again). So each hook
keeps, for each parameter name, the tensors it needs (residuals, DGC's u and v, ...); a bucket's
plan holds them at run time in flat working buffers laid out like the bucket, so a step makes no
extra pass. When a bucket's layout changes, the new plan takes each parameter's state from wherever
it lives (another plan, or a checkpoint loaded before the first step) once, at the rebuild.

:class:`ParameterNames` maps the tensors of ``bucket.parameters()`` to names (``state.bind(model)``
builds it); :class:`ParamStore` tracks where each name's state lives; the checkpoint checks
(``strict`` loading) are at the end.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, Union

import torch

__all__ = ["ParameterNames", "ParamStore", "PlanState", "named_parameters_of", "export_slices", "load_slices",
           "CheckpointMismatch",
           "STATE_FORMAT", "check_header", "check_layout", "check_module_calls", "report_mismatch", "log_skipped",
           "param_tensors_for_load"]

logger = logging.getLogger(__name__)

#: Version of the hook state dicts' layout (``state_dict()["format"]``).
STATE_FORMAT = 2

ParamsLike = Union[torch.nn.Module, Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def named_parameters_of(model: ParamsLike) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` pairs of a DDP model (its ``.module``'s names, as in the model's own
    ``state_dict``), an ``nn.Module``, a ``{name: tensor}`` mapping or an iterable of pairs."""
    module = getattr(model, "module", None) if hasattr(model, "register_comm_hook") else None
    if isinstance(module, torch.nn.Module):
        model = module
    if isinstance(model, torch.nn.Module):
        return list(model.named_parameters())
    pairs = list(model.items()) if isinstance(model, Mapping) else list(model)
    for pair in pairs:
        if (not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str)
                or not isinstance(pair[1], torch.Tensor)):
            raise ValueError("bind() takes a DDP model, an nn.Module, a {name: tensor} mapping or (name, tensor) "
                             f"pairs; got an element {type(pair).__name__}")
    return pairs


class ParameterNames:
    """The names of a model's parameters, found from the tensors DDP puts in its buckets.

    Also gives each parameter that requires a gradient its offset in the model-order concatenation of
    those parameters: a position that does not depend on DDP's bucket layout (the projection hook
    draws its directions there).
    """

    def __init__(self, model: ParamsLike) -> None:
        pairs = named_parameters_of(model)
        if not pairs:
            raise ValueError("bind() found no parameters in the model")
        self._by_id: dict[int, str] = {}
        self.params: dict[str, torch.Tensor] = {}  # also keeps the tensors alive, so ids stay unique
        self.indices: dict[str, int] = {}  # position in named_parameters() order (shared ones once)
        self.model_offsets: dict[str, int] = {}
        offset = 0
        for name, p in pairs:
            if name in self.params:
                raise ValueError(f"two parameters are named {name!r}")
            if id(p) in self._by_id:  # a shared parameter: DDP holds it once, under its first name
                continue
            self._by_id[id(p)] = name
            self.indices[name] = len(self.params)
            self.params[name] = p
            if p.requires_grad:
                self.model_offsets[name] = offset
                offset += p.numel()

    def names_of(self, params: Iterable[torch.Tensor]) -> list[str]:
        """The names of a bucket's parameters, in bucket order.

        Raises:
            ValueError: a parameter does not belong to the bound model (bound to another model).
        """
        names = []
        for p in params:
            name = self._by_id.get(id(p))
            if name is None:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} in a DDP bucket is not a parameter of the "
                                 "model this state was bound to; call state.bind(ddp_model) with the DDP model "
                                 "the hook is registered on")
            names.append(name)
        return names

    def fingerprint(self) -> int:
        """A hash of the names and shapes, equal on ranks that bound the same model."""
        text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in self.params.items())
        return zlib.crc32(text.encode())


class PlanState(Protocol):
    """What a bucket plan offers the store: each parameter's state as standalone tensors."""

    def export(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]: ...


class ParamStore:
    """Where each parameter's state lives: in the plan of the bucket that holds it now, or loose
    (loaded from a checkpoint, or left by a plan whose bucket is gone) until a plan takes it."""

    def __init__(self) -> None:
        self.home: dict[str, PlanState] = {}
        self.loose: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The state of ``names`` that exists (others are absent), removed from where it was: the
        caller's new plan holds it from now on (:meth:`claim`)."""
        taken: dict[str, dict[str, torch.Tensor]] = {}
        by_plan: dict[int, tuple[PlanState, list[str]]] = {}
        for name in names:
            plan = self.home.pop(name, None)
            if plan is not None:
                by_plan.setdefault(id(plan), (plan, []))[1].append(name)
            elif name in self.loose:
                taken[name] = self.loose.pop(name)
        for plan, plan_names in by_plan.values():
            taken.update(plan.export(plan_names))
        return taken

    def claim(self, names: Iterable[str], plan: PlanState) -> None:
        for name in names:
            self.home[name] = plan

    def everything(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's state as standalone tensors (for ``state_dict``), in name order."""
        out = dict(self.loose)
        by_plan: dict[int, tuple[PlanState, list[str]]] = {}
        for name, plan in self.home.items():
            by_plan.setdefault(id(plan), (plan, []))[1].append(name)
        for plan, names in by_plan.values():
            out.update(plan.export(names))
        return dict(sorted(out.items()))

    def clear(self) -> None:
        self.home.clear()
        self.loose.clear()


def export_slices(where: Mapping[str, tuple[int, ...]], flats: Mapping[str, torch.Tensor],
                  names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {field: copy of flats[field][offset:offset + length]}}`` for the ``names`` in ``where``
    (a plan's ``export`` when its state is one flat tensor per field, laid out like the bucket).

    ``where[name]`` is ``(offset, length)`` for a whole parameter, or ``(offset, length, offset in
    the parameter, numel of the parameter)`` for a piece of one (node mode's element shards): the
    export is then parameter-sized, the piece in its place and zeros elsewhere."""
    return {name: {key: _full(flat[where[name][0]:where[name][0] + where[name][1]], where[name])
                   for key, flat in flats.items()}
            for name in names if name in where}


def _full(piece: torch.Tensor, place: tuple[int, ...]) -> torch.Tensor:
    """``piece`` as a standalone tensor of its whole parameter (zeros outside the piece)."""
    if len(place) == 2 or (place[2] == 0 and place[3] == place[1]):
        return piece.clone()
    out = piece.new_zeros(place[3])
    out[place[2]:place[2] + place[1]].copy_(piece)
    return out


def load_slices(where: Mapping[str, tuple[int, ...]], flats: Mapping[str, torch.Tensor],
                taken: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Copy each taken parameter's fields (parameter-sized) into its slice of ``flats``: the piece of
    ``where`` (the inverse of :func:`export_slices`)."""
    for name, entry in taken.items():
        if name in where:
            o, n = where[name][:2]
            start = where[name][2] if len(where[name]) > 2 else 0
            for key, flat in flats.items():
                if key in entry:
                    flat[o:o + n].copy_(entry[key].reshape(-1)[start:start + n])


# -- checkpoints ---------------------------------------------------------------------------------

class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the state it is loaded into (``strict=True``)."""


def report_mismatch(strict: bool, message: str, skipped: list[str]) -> None:
    """Raise ``message`` when loading strictly; otherwise note it in ``skipped`` (logged by the caller)."""
    if strict:
        raise CheckpointMismatch(message + " (load_state_dict(..., strict=False) skips what does not fit)")
    skipped.append(message)


def log_skipped(label: str, skipped: list[str]) -> None:
    """Log what a ``strict=False`` load of ``label``'s state (a method, "FSDP", "HSDP") skipped."""
    for message in skipped:
        logger.warning("pycomm %s load_state_dict(strict=False) skipped: %s", label, message)


def check_header(state_dict: Any, method: str, config: Mapping[str, Any], strict: bool, skipped: list[str],
                 state_format: int = STATE_FORMAT) -> None:
    """Check a state dict's method, format and configuration against this state's.

    The configuration is the state's own (set by its constructor): a checkpoint with another
    setting raises when loading strictly; with ``strict=False`` this state keeps its value and the
    difference is reported as skipped. ``state_format`` is the format the caller reads (the DDP hooks',
    FSDP's and HSDP's states have their own).

    Raises:
        CheckpointMismatch: not a pycomm state dict, another method or format, or (strict) another setting.
    """
    if not isinstance(state_dict, Mapping) or "method" not in state_dict or "format" not in state_dict:
        keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise CheckpointMismatch(f"not a pycomm state dict (expected 'method', 'format', 'config' and 'params'), "
                                 f"got {keys}")
    if state_dict["method"] != method:
        raise CheckpointMismatch(f"the checkpoint is for method {state_dict['method']!r}, this state is {method!r}")
    if state_dict["format"] != state_format:
        raise CheckpointMismatch(f"the checkpoint has state format {state_dict['format']!r}; this state reads "
                                 f"format {state_format}")
    saved = state_dict.get("config", {})
    if not isinstance(saved, Mapping):
        raise CheckpointMismatch(f"the checkpoint's 'config' must be a dict, got {type(saved).__name__}")
    for key, value in config.items():
        if key in saved and _plain(saved[key]) != _plain(value):
            report_mismatch(strict, f"the checkpoint has {key}={saved[key]!r}, this state has {key}={value!r}",
                            skipped)


def check_layout(saved: Mapping[str, Any], layout: Mapping[str, Any]) -> None:
    """Check the values that decide where per-element state lives (world size, shard layout): state of
    another layout cannot be loaded, even with ``strict=False``.

    Raises:
        CheckpointMismatch: a value differs; the message lists each.
    """
    differ = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}" for key, value in layout.items()
              if saved.get(key) != value]
    if differ:
        raise CheckpointMismatch(f"the checkpoint's state is laid out for another run ({'; '.join(differ)}); "
                                 "per-element state resumes only on the same layout")


def check_module_calls(saved: Any, modules: Iterable[str], strict: bool, skipped: list[str]) -> dict[str, int]:
    """The saved call count of each of ``modules`` (the sharded states count calls per FSDP module:
    they seed the rounding). Other module names are a mismatch; a module without a count keeps its own.

    Raises:
        CheckpointMismatch: ``saved`` is not a {module name: int} dict, or (strict) the module names differ.
    """
    if not isinstance(saved, Mapping) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in saved.values()):
        raise CheckpointMismatch(f"the checkpoint's 'calls' must be a {{module name: int >= 0}} dict, got {saved!r}")
    modules = set(modules)
    if set(saved) != modules:
        report_mismatch(strict, f"the checkpoint has modules {sorted(saved)}, the model has {sorted(modules)}",
                        skipped)
    return {name: int(count) for name, count in saved.items() if name in modules}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def param_tensors_for_load(saved: Any, names: Union[ParameterNames, Mapping[str, tuple[int, ...]], None],
                           fields: Mapping[str, bool], strict: bool,
                           skipped: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The per-parameter tensors of a checkpoint that fit, as float32 (plans flatten them).

    ``names`` is the bound model's :class:`ParameterNames` (each tensor has its parameter's shape), or
    the shape each name's tensors must have (a sharded state's), or None (not bound yet: not checked).
    ``fields`` maps each field name to whether the method expects it now (e.g. residuals only with
    error feedback). A name the model does not have, a tensor of another shape, or a field the
    method does not keep is a mismatch (raised when ``strict``, else skipped and reported).
    """
    shapes = ({name: tuple(p.shape) for name, p in names.params.items()} if isinstance(names, ParameterNames)
              else None if names is None else {name: tuple(shape) for name, shape in names.items()})
    if not isinstance(saved, Mapping):
        raise CheckpointMismatch(f"the checkpoint's 'params' must be a {{name: {{field: tensor}}}} dict, got "
                                 f"{type(saved).__name__}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensors in saved.items():
        if shapes is not None and name not in shapes:
            report_mismatch(strict, f"the checkpoint has state for parameter {name!r}, which the model does not "
                                    "have", skipped)
            continue
        if not isinstance(tensors, Mapping):
            raise CheckpointMismatch(f"the checkpoint's state of {name!r} must be a {{field: tensor}} dict")
        kept: dict[str, torch.Tensor] = {}
        for field, t in tensors.items():
            if not fields.get(field, False):
                report_mismatch(strict, f"the checkpoint has {field!r} for parameter {name!r}, which this state "
                                        f"does not keep (it keeps {sorted(k for k, v in fields.items() if v)})",
                                skipped)
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise CheckpointMismatch(f"the checkpoint's {field!r} of {name!r} is not a float tensor")
            if shapes is not None and tuple(t.shape) != shapes[name]:
                report_mismatch(strict, f"the checkpoint's {field!r} of {name!r} has shape {tuple(t.shape)}, this "
                                        f"state expects {shapes[name]}", skipped)
                continue
            kept[field] = t.detach().to(torch.float32)
        if kept:
            out[name] = kept
    return out

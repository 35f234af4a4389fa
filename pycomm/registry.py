"""The method registry behind :func:`pycomm.register`: one line to compress a DDP model.

Each method pairs a state class (whose constructor takes ``process_group`` and the
method's keyword arguments) with a DDP communication hook. New methods join with
:func:`register_method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.distributed as dist

__all__ = ["register", "register_method", "available_methods"]


@dataclass(frozen=True)
class Method:
    state_class: type
    hook: Callable[..., Any]
    summary: str


_METHODS: dict[str, Method] = {}


def register_method(name: str, state_class: type, hook: Callable[..., Any], summary: str = "") -> None:
    """Make ``pycomm.register(ddp, name, **kwargs)`` build ``state_class(process_group, **kwargs)`` and ``hook``."""
    if name in _METHODS:
        raise ValueError(f"a method named {name!r} is already registered")
    _METHODS[name] = Method(state_class, hook, summary)


def available_methods() -> dict[str, str]:
    """Registered method names and their one-line summaries."""
    return {name: m.summary for name, m in sorted(_METHODS.items())}


def register(ddp_model: Any, method: str, process_group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> Any:
    """Register compression method ``method`` on a DDP model and return its state.

    Example::

        model = torch.nn.parallel.DistributedDataParallel(net)
        state = pycomm.register(model, "quant", bits=4)

    A model sharded with FSDP2 (``fully_shard``: it is or contains an ``FSDPModule``) gets
    :func:`pycomm.fsdp.compress` instead, a quantized reduce-scatter on every sharded module, and
    its :class:`~pycomm.fsdp.FSDPCompressionState`; only ``"quant"`` works there (options
    ``bits``, ``bucket_size``, ``stochastic``, ``seed``, ``error_feedback``), over FSDP's own groups.

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` model, before its first backward. The
            state is bound to its parameter names (``state.bind(ddp_model)``): per-parameter state and
            per-layer settings are keyed by the names of ``ddp_model.module.named_parameters()``.
        method: one of :func:`available_methods` (e.g. ``"quant"``).
        process_group: the group to communicate over (None: the default group).
        **kwargs: the method's options, passed to its state class (e.g. ``bits=4`` for ``"quant"``).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(_METHODS))}")
    if not hasattr(ddp_model, "register_comm_hook"):
        from pycomm import fsdp  # lazily: torch's FSDP2 modules are only needed for sharded models

        if fsdp.contains_fsdp(ddp_model):
            return _register_fsdp(fsdp, ddp_model, method, process_group, kwargs)
        raise ValueError(f"register needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
    entry = _METHODS[method]
    try:
        state = entry.state_class(process_group=process_group, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for method {method!r}: {e}") from e
    bind = getattr(state, "bind", None)
    if bind is not None:
        bind(ddp_model)
    ddp_model.register_comm_hook(state, entry.hook)
    return state


def _register_fsdp(fsdp: Any, model: Any, method: str, process_group: Optional[dist.ProcessGroup],
                   kwargs: dict[str, Any]) -> Any:
    if method != "quant":
        raise ValueError(f"under FSDP2 only method 'quant' (a quantized reduce-scatter) is implemented, got "
                         f"{method!r}: DGC's momentum correction needs a full-size accumulator on every rank, which "
                         "undoes FSDP's memory savings; the other methods are DDP all-reduce hooks")
    if process_group is not None:
        raise ValueError("under FSDP2 the reduce-scatter runs over fully_shard's own mesh; pass process_group=None")
    try:
        return fsdp.compress(model, method, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for method 'quant' under FSDP2 (it takes bits, bucket_size, stochastic, "
                         f"seed, error_feedback): {e}") from e

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

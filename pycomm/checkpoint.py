"""Checkpoints of hook state across ranks: every rank's state in one file, each rank's part on resume.

A hook state is per rank (residuals, DGC's u and v differ from rank to rank), while trainers often
write one file from rank 0. :func:`gather_state_dicts` collects every rank's ``state_dict()`` on every
rank; :func:`load_rank_state_dict` gives each rank its own entry back.

Resuming on another world size: rank r loads entry r when the checkpoint has one; a rank without an
entry takes rank 0's step, settings and per-layer choice but starts from zero per-parameter state
(residuals, u and v), with a warning, and a warning says that the world size changed.
Entries of ranks that no longer exist are dropped: the gradient mass they held (what their
residuals had not sent yet) is lost, so resume on the same world size where you can.

Example::

    import torch, pycomm
    state = pycomm.register(ddp_model, "dgc", density=0.01)
    ...                                                   # train
    everyone = pycomm.checkpoint.gather_state_dicts(state)  # on every rank
    if torch.distributed.get_rank() == 0:
        torch.save({"model": ddp_model.state_dict(), "pycomm": everyone}, "ckpt.pt")
    # on resume, after pycomm.register on the new DDP model:
    saved = torch.load("ckpt.pt", weights_only=True)
    pycomm.checkpoint.load_rank_state_dict(state, saved["pycomm"])
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["gather_state_dicts", "load_rank_state_dict", "without_param_state", "to_cpu"]

logger = logging.getLogger(__name__)


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor (in dicts, lists and tuples) copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def gather_state_dicts(state: Any, group: Optional[dist.ProcessGroup] = None) -> list[dict[str, Any]]:
    """Every rank's ``state.state_dict()`` (tensors on the CPU), in rank order, on every rank.

    A collective: call it on every rank of ``group`` (None: the default group) at the same point.
    """
    own = to_cpu(state.state_dict())
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, own, group=group)
    return everyone


def load_rank_state_dict(state: Any, state_dicts: Sequence[dict[str, Any]], strict: bool = True,
                         group: Optional[dist.ProcessGroup] = None) -> bool:
    """Load this rank's entry of :func:`gather_state_dicts`'s list into ``state``.

    Returns whether an entry was loaded. On another world size, a rank without an entry keeps its
    fresh state (zero residuals) and logs a warning (see the module docstring).

    Raises:
        ValueError: ``state_dicts`` is not a non-empty list, or (``strict``) the entry does not fit
            the state (see the states' ``load_state_dict``).
    """
    if not isinstance(state_dicts, (list, tuple)) or not state_dicts:
        raise ValueError(f"state_dicts must be the non-empty list of gather_state_dicts(), got "
                         f"{type(state_dicts).__name__}")
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if initialized else 0
    world = dist.get_world_size(group) if initialized else 1
    if len(state_dicts) != world:
        logger.warning("pycomm: the checkpoint holds the hook state of %d ranks, this run has %d; rank r loads "
                       "entry r where it exists, the others start from zero state, and the entries of ranks "
                       "beyond %d are dropped", len(state_dicts), world, world)
    if rank >= len(state_dicts):
        logger.warning("pycomm: rank %d has no hook state in the checkpoint; it takes rank 0's step and settings "
                       "and starts from zero residuals", rank)
        state.load_state_dict(without_param_state(state_dicts[0]), strict=strict)
        return False
    state.load_state_dict(state_dicts[rank], strict=strict)
    return True


def without_param_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A hook state dict with its per-parameter tensors (and an inner state's) left out: the step and
    settings every rank must share, without another rank's residuals (what a rank without its own
    entry loads)."""
    out = {k: v for k, v in state_dict.items() if k != "params"}
    out["params"] = {}
    if isinstance(state_dict.get("inner"), dict):
        out["inner"] = without_param_state(state_dict["inner"])
    return out

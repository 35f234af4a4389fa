"""Ranks agree on a hook's settings before they compress: one tiny collective, once.

Every rank of a compressed all-reduce must send payloads of the same sizes in the same
collectives. Ranks configured differently (``bits=4`` on one, ``bits=8`` on another, a
different ``bucket_size``, DGC density or ``value_dtype``) would otherwise hand Gloo
collectives of different sizes, which aborts the process from a background thread, and
ranks on different methods or with a different ``start_iter`` would wait in different
collectives until the process-group timeout.

So the first time a hook runs (and again after ``load_state_dict`` or a user's
``set_layer_params``), :func:`check_settings` gathers from every rank one fixed-size int64
tensor: a hash of the method's name and one hash per setting that shapes the payloads or
the result every rank must compute identically. It runs on the first hook call of that
step, whatever ``start_iter`` is, so every method on every rank meets in this same
collective. On a mismatch the ranks exchange their readable settings (``all_gather_object``,
only on this error path) and every rank raises the same :class:`RankDisagreementError`,
naming each setting that differs and its value on every rank.

Cost: one all-gather of ``W x 32`` int64 once per setting change. On CUDA it reads the
gathered hashes on the host, one device synchronisation at that one step (not in the
steady state).
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["RankDisagreementError", "check_settings", "settings_changed", "mark_agreed", "SETTINGS"]

#: The settings of each method that every rank must share: they shape the payloads (sizes,
#: which collectives run at which step) or the result every rank computes from them.
SETTINGS: dict[str, tuple[str, ...]] = {
    "quant": ("bits", "bucket_size", "min_numel", "start_iter", "iter", "layer_params", "hierarchy"),
    "dgc": ("density", "warmup_steps", "warmup_epochs", "steps_per_epoch", "warmup_densities", "min_numel",
            "value_dtype", "momentum", "nesterov", "iter", "layer_params", "hierarchy"),
    "spsa-projection": ("num_directions", "distribution", "codec", "seed", "iter", "hierarchy"),
    # Plus the inner state's settings, under "quant." or "dgc." (see _settings).
    "lgreco": ("family", "default", "candidates", "start_iter", "period", "acc_steps", "alpha", "levels",
               "hierarchy"),
}

_FORMAT = 0x70C0_A6EE_0001  # first slot: tells this digest's layout apart from anything else
_SLOTS = 32                  # format, method, then up to 30 settings: the same size for every method
_SHOWN_CHARS = 200           # a setting's value in the error message is cut to this length


class RankDisagreementError(ValueError):
    """The ranks of a process group configured a pycomm hook differently (raised on every rank)."""


def settings_changed(state: Any) -> None:
    """Make the next hook call check the settings again (after ``load_state_dict``, ``set_layer_params``)."""
    state._settings_agreed = False


def mark_agreed(state: Any) -> None:
    """Record that the ranks' settings agree without checking: for changes every rank computes
    identically (L-GreCo's re-solves), which need no collective."""
    state._settings_agreed = True


def check_settings(state: Any, bucket: dist.GradBucket, method: str) -> None:
    """Before ``state``'s hook does anything else this step: unless already agreed, check that every
    rank runs ``method`` with the same :data:`SETTINGS`.

    Raises:
        RankDisagreementError: on every rank, when any rank's method or settings differ.
    """
    if getattr(state, "_settings_agreed", False):
        return
    settings = _settings(state, method)
    group = state.process_group
    world = dist.get_world_size(group)
    if world > 1:
        row = [_FORMAT, _hash(f"method={method}")] + [_hash(f"{name}={_canonical(v)}") for name, v in settings]
        if len(row) > _SLOTS:
            raise AssertionError(f"{method} has more settings than the agreement digest holds ({len(row)} > {_SLOTS})")
        local = torch.tensor(row + [0] * (_SLOTS - len(row)), dtype=torch.int64).to(bucket.buffer().device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        rows = torch.stack(gathered).cpu()  # the one host wait, once per setting change
        if not bool((rows == rows[0]).all()):
            readable = (method, [(name, _shown(v)) for name, v in settings])
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, readable, group=group)
            raise RankDisagreementError(_message(everyone, group))
    mark_agreed(state)
    if hasattr(state, "inner"):  # L-GreCo: its digest covered the inner state's settings
        mark_agreed(state.inner)


def _settings(state: Any, method: str) -> list[tuple[str, Any]]:
    names = SETTINGS.get(method)
    if names is None:
        raise ValueError(f"no agreement settings for method {method!r}; known: {sorted(SETTINGS)}")
    settings = [(name, getattr(state, name)) for name in names]
    if method == "lgreco":
        inner_method = "quant" if state.family == "quant" else "dgc"
        settings += [(f"{inner_method}.{name}", getattr(state.inner, name)) for name in SETTINGS[inner_method]]
    return settings


def _canonical(value: Any) -> str:
    """A text equal on every process for equal settings (no per-process hash seed, no dict order,
    ``1 == 1.0``, a tuple loaded back as a list)."""
    if isinstance(value, dict):
        items = sorted((_canonical(k), _canonical(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_canonical(v) for v in value) + "]"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        as_float = float(value)
        return repr(as_float) if as_float == value else repr(value)
    return repr(value)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + f"... ({len(text)} characters)"


def _message(everyone: list[tuple[str, list[tuple[str, str]]]], group: Optional[dist.ProcessGroup]) -> str:
    """The same text on every rank: built from what every rank gathered."""
    world = len(everyone)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))

    def per_rank(values: list[str]) -> str:
        return ", ".join(f"rank {ranks[i]}: {v}" for i, v in enumerate(values))

    methods = [m for m, _ in everyone]
    if len(set(methods)) > 1:
        differing = f"method ({per_rank([repr(m) for m in methods])})"
        what = "compression method"
    else:
        columns = list(zip(*(values for _, values in everyone)))  # per setting: (name, value) of each rank
        differing = "; ".join(f"{column[0][0]} ({per_rank([v for _, v in column])})"
                              for column in columns if len({v for _, v in column}) > 1)
        # Equal readable values with different hashes (e.g. objects whose repr hides a difference).
        differing = differing or "a setting whose printed values agree"
        what = f"{methods[0]} hook's settings"
    return (f"pycomm: the {world} ranks disagree on the {what}, so their payloads would not match: "
            f"{differing}. Every rank must use the same method and settings (the state's arguments, "
            f"set_layer_params at the same step, load_state_dict of checkpoints with the same settings).")

"""The base of pycomm's hook states: pickling without the process group or an observer."""

from typing import Any


class HookState:
    """Pickling drops ``process_group`` (a process group cannot be pickled) and ``observer``
    (a callable of the running job, e.g. L-GreCo's accumulator, often not picklable); after
    unpickling the group is None, the default group, as in PyTorch's PowerSGDState (states
    with an observer reset it in their own ``__setstate__``)."""

    process_group: Any = None
    _NOT_PICKLED = ("process_group", "observer", "_settings_agreed")  # ranks check again after loading

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None

"""The base of pycomm's hook states: pickling without the process group."""

from typing import Any


class HookState:
    """Pickling drops ``process_group`` (a process group cannot be pickled); after
    unpickling it is None, the default group, as in PyTorch's PowerSGDState."""

    process_group: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "process_group"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None

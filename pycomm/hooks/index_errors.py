"""DGC's index checks on CUDA, read back later without waiting for the device."""

from collections import deque
from typing import Optional

import torch

__all__ = ["IndexErrors"]


class IndexErrors:
    """Index checks of the sync-free path, read back without waiting for the device.

    There, ``dgc_mask`` and ``densify`` write the first out-of-range position of their indices
    into a device flag (-1: none) instead of raising, which would wait for the stream each step.
    The flags are copied to pinned host memory without blocking, behind an event; each later
    hook call raises the first error whose copy has completed (an event query: no wait).
    """

    def __init__(self) -> None:
        self._pending: deque = deque()

    def record(self, flags: torch.Tensor, checks: list[tuple[str, torch.Tensor, int, str]]) -> None:
        """``flags[i]`` is the first bad position of ``checks[i] = (what, indices, numel, consequence)``."""
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event: Optional[torch.cuda.Event] = torch.cuda.Event()
            event.record()
        else:
            host, event = flags, None
        self._pending.append((host, event, checks))

    def raise_ready(self, wait: bool = False) -> None:
        """Raise the first recorded error whose flags have reached the host (all of them with ``wait``)."""
        while self._pending:
            host, event, checks = self._pending[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
            self._pending.popleft()
            for position, (what, indices, numel, consequence) in zip(host.tolist(), checks):
                if position >= 0:
                    self._pending.clear()
                    raise RuntimeError(f"pycomm dgc: {what} held index {int(indices.reshape(-1)[position])} at "
                                       f"position {position}, outside [0, {numel}); {consequence}")

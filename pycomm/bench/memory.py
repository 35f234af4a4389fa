"""The peak memory of a worker process during one method's training loop.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the peak of tensor memory
  (kind ``"cuda-allocated"``).
* CPU on Linux: the process's peak resident set size ``VmHWM`` (``/proc/self/status``), reset before the method
  by writing ``5`` to ``/proc/self/clear_refs`` after a ``gc.collect`` and glibc's ``malloc_trim(0)`` (kind
  ``"rss"``). It counts everything resident: the torch libraries and the corpus too (``start_bytes`` is the
  resident size after the reset), and memory that the allocator kept from an earlier method if it could not
  return it.
* Elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the peak of the process's whole life, never reset
  (kind ``"ru_maxrss"``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from typing import Optional

import torch

__all__ = ["PeakMemory", "MEMORY_KINDS"]

#: What each ``kind`` of :class:`PeakMemory` measures (the report's table header says it).
MEMORY_KINDS: dict[str, str] = {
    "cuda-allocated": "peak CUDA tensor memory of a rank (torch.cuda.max_memory_allocated, reset per method)",
    "rss": "peak RSS of a rank (VmHWM, reset per method; includes torch and the corpus)",
    "ru_maxrss": "peak RSS of a rank over its whole life (ru_maxrss, never reset: max of this and earlier methods)",
}


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_heap() -> None:
    """Return the allocator's free memory to the system where glibc allows it, so that the reset starts low."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory of this process from :meth:`reset` to :meth:`peak_bytes` (see the module docstring).

    Args:
        device: the device the rank trains on.

    Attributes:
        kind: a key of :data:`MEMORY_KINDS`, set by :meth:`reset`.
        start_bytes: the figure right after the reset (resident size, or allocated CUDA memory).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "ru_maxrss"
        self.start_bytes: Optional[int] = None

    def reset(self) -> None:
        """Start a new peak."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda-allocated"
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            return
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        except OSError:
            self.kind = "ru_maxrss"
            self.start_bytes = None
            return
        rss = _status_kib("VmRSS")
        self.kind = "rss" if rss is not None else "ru_maxrss"
        self.start_bytes = None if rss is None else rss * 1024

    def peak_bytes(self) -> int:
        """The peak since :meth:`reset`, in bytes (:attr:`kind` says of what)."""
        if self.kind == "cuda-allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss":
            hwm = _status_kib("VmHWM")
            if hwm is not None:
                return hwm * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # macOS: bytes; Linux: KiB

"""Which processes still run: the clean-up tests of the benchmark's namespaces share these."""

from __future__ import annotations

import time
from typing import Optional


def running_since(pid: int) -> Optional[int]:
    """The start time of a running (not zombie) process ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def wait_gone(processes: dict[int, Optional[int]], timeout_s: float = 10.0) -> list[int]:
    """The processes of ``processes`` (pid -> start time) still alive after up to ``timeout_s``: killed processes
    may take a moment to exit and be reaped, and a zombie or a reused pid is not a survivor."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p, t in processes.items() if running_since(p) == t]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive

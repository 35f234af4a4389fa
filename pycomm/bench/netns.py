"""A shaped network for the end-to-end benchmark: a Linux network namespace whose loopback is rate-limited.

:class:`ShapedNamespace` creates a network namespace of its own, brings its
loopback up and puts a token-bucket filter (``tc qdisc ... tbf``) on it, so that
every byte that the benchmark's workers exchange over 127.0.0.1 inside it
crosses one link of the requested rate. The link is shared: its rate is the
aggregate of all workers' traffic, like W machines behind one uplink. A delay is
added with ``netem`` where the kernel has it; where it does not, the namespace
still shapes the rate and :attr:`ShapedNamespace.delay_note` says that the delay
was not applied.

The recipe (run as root)::

    ip netns add NAME
    ip netns exec NAME ip link set lo up
    ip netns exec NAME tc qdisc add dev lo root tbf rate 1gbit burst 256kb latency 50ms

Commands run inside with :meth:`ShapedNamespace.exec_prefix`. Removal kills
whatever still runs inside and deletes the namespace; it is idempotent, and the
context manager removes it on any exit, exceptions and Ctrl-C included.

Example::

    with ShapedNamespace("100mbit") as net:
        subprocess.run(net.exec_prefix() + ["python", "-c", "print('inside')"], check=True)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from typing import Optional

__all__ = [
    "NAME_PREFIX",
    "parse_rate",
    "parse_delay",
    "shaping_unavailable_reason",
    "read_tx_bytes",
    "shape_device",
    "ShapedNamespace",
    "remove_namespace",
]

logger = logging.getLogger(__name__)

#: Every namespace made here is named ``NAME_PREFIX + <pid>-<random>``.
NAME_PREFIX = "pycomm-e2e-"

# tc's rate units (bits per second); "bps" style byte units are deliberately not accepted
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_DELAY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_rate(text: str) -> float:
    """Bits per second of a tc rate such as ``"100mbit"`` or ``"1gbit"``.

    Raises:
        ValueError: for anything else (units: bit, kbit, mbit, gbit, tbit).
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"bad rate {text!r}: expected a number and one of {', '.join(_RATE_UNITS)}, e.g. 100mbit")
    value = float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"rate must be positive, got {text!r}")
    return value


def parse_delay(text: str) -> float:
    """Seconds of a tc delay such as ``"1ms"``, ``"500us"`` or ``"0"``.

    Raises:
        ValueError: for anything else (units: s, ms, us).
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text)
    unit = match.group(2) if match else None
    if not match or (unit and unit not in _DELAY_UNITS) or (not unit and float(match.group(1)) != 0):
        raise ValueError(f"bad delay {text!r}: expected a number and one of {', '.join(_DELAY_UNITS)}, e.g. 1ms")
    return float(match.group(1)) * _DELAY_UNITS.get(unit or "s", 1.0)


def shaping_unavailable_reason() -> Optional[str]:
    """Why this process cannot build a shaped namespace, or None when it can (root on Linux, ip and tc found)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2)"
    return None


def read_tx_bytes(interface: str = "lo") -> int:
    """Bytes transmitted so far by ``interface`` in the calling process's network namespace.

    Reads ``/sys/class/net/<interface>/statistics/tx_bytes`` (which ``ip netns
    exec`` remounts for the namespace), or ``/proc/net/dev`` (always per
    namespace) where sysfs is not the namespace's own.
    """
    try:
        with open(f"/sys/class/net/{interface}/statistics/tx_bytes", encoding="ascii") as fh:
            return int(fh.read())
    except OSError:
        pass
    with open("/proc/net/dev", encoding="ascii") as fh:
        for line in fh:
            name, sep, counters = line.partition(":")
            if sep and name.strip() == interface:
                return int(counters.split()[8])  # rx: 8 fields, then tx bytes
    raise RuntimeError(f"interface {interface!r} not found in /proc/net/dev")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _check(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed: {done.stderr.strip()}")


def shape_device(exec_prefix: list[str], device: str, rate: str, delay: Optional[str] = None, *,
                 burst: str = "256kb", latency: str = "50ms") -> tuple[bool, Optional[str], str]:
    """Limit the egress of ``device`` (run through ``exec_prefix``, e.g. ``ip netns exec NAME``) to ``rate`` with a
    tbf, under a netem ``delay`` where the kernel has netem.

    Returns:
        ``(delay_applied, delay_note, qdisc)``: whether the delay is in effect, why a requested delay is not
        (None otherwise), and the qdisc lines as ``tc qdisc show`` prints them.

    Raises:
        RuntimeError: when a tc command fails (with its message).
    """
    def inside(*args: str) -> subprocess.CompletedProcess:
        return _run(exec_prefix + list(args))

    tbf = ["tbf", "rate", rate, "burst", burst, "latency", latency]
    delay_applied, delay_note = False, None
    if delay:
        # netem delays every packet, the tbf under it limits the rate
        netem = inside("tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "netem", "delay", delay,
                       "limit", "100000")
        if netem.returncode == 0:
            _check(inside("tc", "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *tbf),
                   f"tc qdisc add tbf on {device} (under netem)")
            delay_applied = True
        else:
            delay_note = f"delay {delay} not applied: netem unavailable ({netem.stderr.strip()})"
            logger.warning("%s", delay_note)
    if not delay_applied:
        _check(inside("tc", "qdisc", "add", "dev", device, "root", *tbf), f"tc qdisc add tbf on {device}")
    return delay_applied, delay_note, inside("tc", "qdisc", "show", "dev", device).stdout.strip()


def _namespace_pids(name: str) -> list[int]:
    done = _run(["ip", "netns", "pids", name])
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def remove_namespace(name: str) -> None:
    """Kill every process still inside namespace ``name`` and delete it (no error if it is gone)."""
    for pid in _namespace_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done = _run(["ip", "netns", "del", name])
    if done.returncode != 0 and name in _list_namespaces():
        raise RuntimeError(f"could not delete network namespace {name}: {done.stderr.strip()}")


def _list_namespaces() -> list[str]:
    done = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


class ShapedNamespace:
    """A network namespace with its loopback shaped to ``rate`` (and ``delay`` where netem exists).

    Args:
        rate: link rate in tc syntax, e.g. ``"100mbit"``, ``"1gbit"``.
        delay: one-way delay added to every packet, e.g. ``"1ms"``; None or
            ``"0"`` for none. Needs the kernel's netem qdisc; without it the
            rate is still shaped and :attr:`delay_note` says why no delay was added.
        burst: token-bucket size (tc syntax; must hold one 64 KiB loopback packet).
        latency: longest time a packet may wait in the token bucket's queue.
        name: namespace name; default ``NAME_PREFIX + <pid>-<random>``.

    Attributes:
        name: the namespace's name.
        rate_bps: the rate in bits per second.
        delay_applied: whether the delay is in effect.
        delay_note: why a requested delay is not applied (None otherwise).
        qdisc: the tc qdisc line in effect, as ``tc qdisc show`` prints it.
    """

    def __init__(self, rate: str, delay: Optional[str] = None, *, burst: str = "256kb", latency: str = "50ms",
                 name: Optional[str] = None) -> None:
        self.rate = rate
        self.rate_bps = parse_rate(rate)
        self.delay = delay if delay and parse_delay(delay) > 0 else None
        self.burst = burst
        self.latency = latency
        self.name = name or f"{NAME_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.delay_applied = False
        self.delay_note: Optional[str] = None
        self.qdisc = ""
        self._created = False

    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def _inside(self, *args: str) -> subprocess.CompletedProcess:
        return _run(self.exec_prefix() + list(args))

    def create(self) -> "ShapedNamespace":
        """Create the namespace and shape its loopback; on any failure nothing is left behind.

        Raises:
            RuntimeError: when shaping is not allowed here or a command fails (with its message).
        """
        reason = shaping_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        done = _run(["ip", "netns", "add", self.name])
        if done.returncode != 0:
            raise RuntimeError(f"ip netns add {self.name} failed: {done.stderr.strip()}")
        self._created = True
        try:
            self._check(self._inside("ip", "link", "set", "lo", "up"), "ip link set lo up")
            self.delay_applied, self.delay_note, self.qdisc = shape_device(
                self.exec_prefix(), "lo", self.rate, self.delay, burst=self.burst, latency=self.latency)
        except BaseException:
            self.remove()
            raise
        logger.info("network namespace %s: %s", self.name, self.qdisc)
        return self

    @staticmethod
    def _check(done: subprocess.CompletedProcess, what: str) -> None:
        _check(done, what)

    def pids(self) -> list[int]:
        """Ids of the processes inside the namespace."""
        return _namespace_pids(self.name)

    def exists(self) -> bool:
        """Whether the namespace exists."""
        return self.name in _list_namespaces()

    def remove(self) -> None:
        """Kill what runs inside and delete the namespace; safe to call more than once."""
        if self._created:
            remove_namespace(self.name)
            self._created = False
            logger.info("removed network namespace %s", self.name)

    def __enter__(self) -> "ShapedNamespace":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

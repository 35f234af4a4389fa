"""Emulated nodes for the end-to-end benchmark: N network namespaces joined by a bridge, each uplink shaped.

:class:`EmulatedNodes` builds the topology of a small cluster on one machine
(as root on Linux)::

    node 0 namespace                 switch namespace                 node 1 namespace
    lo (intra-node, unshaped)        br0 (Linux bridge)               lo (intra-node, unshaped)
    eth0 198.18.0.1/24 <--veth--> n0 -+- n1 <--veth--> eth0 198.18.0.2/24
         tbf egress                 tbf egress (= node 0's ingress)

* Every node namespace has its loopback up and one veth interface, ``eth0``
  (:data:`NODE_INTERFACE`), whose peer ``n<i>`` sits in the switch namespace,
  attached to the bridge ``br0``. Node ``i`` has the address ``198.18.0.<i+1>/24``
  from the benchmarking range 198.18.0.0/15 (RFC 2544). There is no default
  route and nothing is created in the root namespace, so nothing is routed outside.
* With a rate, tc's token-bucket filter shapes each node's uplink in both
  directions: the egress of the node's ``eth0`` and the egress of its switch-side
  peer (the node's ingress). A delay is added under netem where the kernel has
  it (:func:`pycomm.bench.netns.shape_device`); where it does not, the rate is
  still shaped and :attr:`EmulatedNodes.delay_note` says so.
* Traffic between two processes of the same node stays in that node's
  namespace: to the node's own address it goes over ``lo``, unshaped.
* All names start with ``NAME_PREFIX + <pid>-<random>`` (``pycomm-e2e-...``), so
  stale ones can be found with ``ip netns list``. :meth:`EmulatedNodes.remove`
  kills every process in the namespaces and deletes them (the veths and the
  bridge go with them); it is idempotent, and the context manager calls it on any
  exit, exceptions and KeyboardInterrupt included (run under
  :func:`pycomm.bench.launcher.signals_raise_keyboard_interrupt` so that SIGTERM
  and SIGHUP are one).

Example::

    with EmulatedNodes(2, "1gbit") as nodes:
        subprocess.run(nodes.exec_prefix(1) + ["python", "-c", "print('on node 1')"], check=True)
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from typing import Optional

from pycomm.bench.netns import (NAME_PREFIX, _list_namespaces, _namespace_pids, _run, parse_delay, parse_rate,
                                remove_namespace, shape_device, shaping_unavailable_reason)

__all__ = ["NODE_INTERFACE", "NODE_SUBNET", "MAX_NODES", "EmulatedNodes"]

logger = logging.getLogger(__name__)

#: The inter-node interface of every node namespace.
NODE_INTERFACE: str = "eth0"
#: Node ``i`` has address ``198.18.0.<i+1>`` in this /24 of the benchmarking range 198.18.0.0/15.
NODE_SUBNET: str = "198.18.0.0/24"
#: Most nodes one /24 holds (addresses .1 to .254).
MAX_NODES: int = 254


class EmulatedNodes:
    """``nodes`` network namespaces, each with one veth uplink onto a bridge in a switch namespace.

    Args:
        nodes: number of node namespaces (1 to :data:`MAX_NODES`).
        rate: each uplink's rate in tc syntax (``"1gbit"``), both directions; None: unshaped.
        delay: one-way delay added on each uplink egress (node -> switch and switch -> node), e.g. ``"1ms"``;
            needs netem (see the module docstring).
        burst, latency: tbf settings (the burst must hold one GSO segment of 64 KiB).
        prefix: name prefix; default ``NAME_PREFIX + <pid>-<random>``.

    Attributes:
        names: the node namespaces' names, node 0 first.
        switch: the switch namespace's name.
        addresses: node ``i``'s IPv4 address (no prefix length).
        delay_applied, delay_note: as :class:`pycomm.bench.netns.ShapedNamespace` has them.
        qdiscs: ``{"<namespace>/<device>": qdisc line}`` for every shaped device.
    """

    def __init__(self, nodes: int, rate: Optional[str] = None, delay: Optional[str] = None, *,
                 burst: str = "256kb", latency: str = "50ms", prefix: Optional[str] = None) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in 1..{MAX_NODES} (one /24 of 198.18.0.0/15), got {nodes}")
        if rate is not None:
            parse_rate(rate)
        self.nodes = nodes
        self.rate = rate
        self.delay = delay if delay and parse_delay(delay) > 0 else None
        self.burst = burst
        self.latency = latency
        self.prefix = prefix or f"{NAME_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.names = [f"{self.prefix}-node{i}" for i in range(nodes)]
        self.switch = f"{self.prefix}-switch"
        self.addresses = [f"198.18.0.{i + 1}" for i in range(nodes)]
        self.delay_applied = False
        self.delay_note: Optional[str] = None
        self.qdiscs: dict[str, str] = {}
        self._made: list[str] = []

    @staticmethod
    def _ip(namespace: str, *args: str) -> None:
        done = _run(["ip", "-n", namespace, *args])
        if done.returncode != 0:
            raise RuntimeError(f"ip -n {namespace} {' '.join(args)} failed: {done.stderr.strip()}")

    def _add_namespace(self, name: str) -> None:
        done = _run(["ip", "netns", "add", name])
        if done.returncode != 0:
            raise RuntimeError(f"ip netns add {name} failed: {done.stderr.strip()}")
        self._made.append(name)
        self._ip(name, "link", "set", "lo", "up")

    def exec_prefix(self, node: int) -> list[str]:
        """The argv prefix that runs a command inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.names[node]]

    def create(self) -> "EmulatedNodes":
        """Build the namespaces, veths, bridge and shaping; on any failure nothing is left behind.

        Raises:
            RuntimeError: when namespaces are not allowed here or a command fails (with its message).
        """
        reason = shaping_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        try:
            self._add_namespace(self.switch)
            self._ip(self.switch, "link", "add", "br0", "type", "bridge")
            self._ip(self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                self._add_namespace(name)
                peer = f"n{i}"
                # made inside the node namespace with its peer in the switch's: no interface in the root namespace
                self._ip(name, "link", "add", NODE_INTERFACE, "type", "veth", "peer", "name", peer,
                         "netns", self.switch)
                self._ip(self.switch, "link", "set", peer, "master", "br0")
                self._ip(self.switch, "link", "set", peer, "up")
                self._ip(name, "addr", "add", f"{self.addresses[i]}/24", "dev", NODE_INTERFACE)
                self._ip(name, "link", "set", NODE_INTERFACE, "up")
                if self.rate is not None:
                    for namespace, device in ((name, NODE_INTERFACE), (self.switch, peer)):
                        delay = self.delay if self.delay_note is None else None  # no netem: say so once
                        applied, note, qdisc = shape_device(["ip", "netns", "exec", namespace], device, self.rate,
                                                            delay, burst=self.burst, latency=self.latency)
                        if delay is not None:
                            self.delay_applied, self.delay_note = applied, note
                        self.qdiscs[f"{namespace}/{device}"] = qdisc
        except BaseException:
            self.remove()
            raise
        logger.info("emulated %d nodes (%s) on bridge br0 in %s, uplinks %s", self.nodes, ", ".join(self.addresses),
                    self.switch, self.rate or "unshaped")
        return self

    def all_names(self) -> list[str]:
        """Every namespace of the topology: the nodes, then the switch."""
        return [*self.names, self.switch]

    def pids(self) -> list[int]:
        """Ids of the processes inside any of the namespaces."""
        return [pid for name in self.all_names() for pid in _namespace_pids(name)]

    def kill_processes(self) -> None:
        """SIGKILL every process inside the namespaces (the namespaces stay)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def exists(self) -> bool:
        """Whether any of the namespaces exists."""
        present = set(_list_namespaces())
        return any(name in present for name in self.all_names())

    def remove(self) -> None:
        """Kill what runs inside and delete the namespaces (veths and bridge with them); safe to call more than
        once. Deletes every namespace it can, then raises the first failure, if any."""
        failures = []
        # nodes first: their processes die before the switch that joins them goes
        for name in [n for n in self.all_names() if n in self._made]:
            try:
                remove_namespace(name)
                self._made.remove(name)
            except RuntimeError as e:
                failures.append(e)
        if failures:
            raise failures[0]
        logger.info("removed emulated nodes %s*", self.prefix)

    def __enter__(self) -> "EmulatedNodes":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def describe(self) -> dict[str, object]:
        """The topology as a JSON-friendly dict (for the report's ``network`` entry)."""
        return {"nodes": self.nodes, "namespaces": self.names, "switch": self.switch, "addresses": self.addresses,
                "interface": NODE_INTERFACE, "subnet": NODE_SUBNET, "qdiscs": dict(self.qdiscs)}


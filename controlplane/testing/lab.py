"""A test's lab: the topologies it built, helpers that speak in roles ("lan", "router"),
and the clean-up that deletes everything the test made, whatever happened."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from controlplane.testing import observe, topology
from controlplane.testing.shell import sh
from controlplane.testing.traffic import Capture, TcpConn, UdpConn

if TYPE_CHECKING:
    from controlplane.config import Config
    from controlplane.core.flowpath import Flow
    from controlplane.service.ruleset import ApplyResult


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)
K = TypeVar("K", TcpConn, UdpConn)


class Lab:
    """A built topology. Every helper takes a role of the description, not a real name."""

    def __init__(self, built: topology.Built, owner: NetLab) -> None:
        self.built = built
        self._owner = owner

    def ns(self, role: str) -> str:
        """The real namespace name of ROLE (for ``--netns`` and ``ip -n``)."""
        return self.built[role]

    __getitem__ = ns

    def sh(self, role: str, *args: str, check: bool = True, input: str | None = None) -> str:
        """Run a command inside ROLE's namespace; return stdout (fails the test on error)."""
        return sh(*args, netns=self.ns(role), check=check, input=input)

    def apply(self, role: str, config: Config | dict[str, Any] | str | Path) -> ApplyResult:
        """``offloadctl apply`` of CONFIG (Config, mapping, YAML text or Path) in ROLE."""
        return observe.apply_config(self.ns(role), config)

    def tcp(
        self, client: str, server: str, to: str, port: int = 0, *,
        listen: tuple[str, int] | None = None, timeout: float = 30.0,
    ) -> TcpConn:  # fmt: skip
        """A TCP connection from CLIENT to TO:PORT, accepted in SERVER on LISTEN (default:
        any address, PORT, or an ephemeral port when PORT is 0). Closed after the test."""
        return self._conn(TcpConn, client, server, (to, port), listen, timeout)

    def udp(
        self, client: str, server: str, to: str, port: int = 0, *,
        listen: tuple[str, int] | None = None, timeout: float = 5.0,
    ) -> UdpConn:  # fmt: skip
        """UDP from CLIENT to TO:PORT, answered in SERVER (see ``tcp``)."""
        return self._conn(UdpConn, client, server, (to, port), listen, timeout)

    def _conn(
        self, cls: type[K], client: str, server: str, target: tuple[str, int],
        listen: tuple[str, int] | None, timeout: float,
    ) -> K:  # fmt: skip
        where = listen or ("::" if ":" in target[0] else "0.0.0.0", target[1])
        return self._owner.keep(cls(self.ns(client), self.ns(server), target, where, timeout))

    def capture(self, role: str, dev: str) -> Capture:
        """Record the TCP/UDP addresses crossing DEV in ROLE (NAT on the wire)."""
        return self._owner.keep(Capture(self.ns(role), dev))

    def classic_path(self, role: str, devices: list[str] | None = None) -> observe.ClassicPath:
        """Start counting ROLE's classic-path (forward hook) packets per input device."""
        return observe.ClassicPath(self.ns(role), devices)

    def conntrack_entry(self, role: str, conn: TcpConn | UdpConn) -> Flow | None:
        """CONN's conntrack entry in ROLE, read as ``offloadctl flows`` reads it."""
        return observe.conntrack_entry(self.ns(role), conn)

    def wait_offloaded(self, role: str, conn: TcpConn | UdpConn, timeout: float = 10.0) -> Flow:
        """CONN's entry in ROLE once ``[OFFLOAD]``; fails the test after TIMEOUT."""
        return observe.wait_offloaded(self.ns(role), conn, timeout)


class NetLab:
    """What the ``netlab`` fixture gives a test: ``build(topology)`` and ``namespace()``;
    ``close()`` (run by the fixture, also after a failure) deletes every namespace made
    and closes every connection and capture."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self._open: list[_Closable] = []

    def build(self, description: topology.Topology) -> Lab:
        return Lab(topology.build(description, self.created), self)

    def namespace(self, role: str = "ns") -> str:
        """A fresh, empty namespace (loopback up)."""
        return topology.add_namespace(role, self.created)

    def keep(self, thing: C) -> C:
        self._open.append(thing)
        return thing

    def close(self) -> None:
        for thing in reversed(self._open):
            with contextlib.suppress(OSError):
                thing.close()
        for name in reversed(self.created):
            topology.delete_namespace(name)
        self.created.clear()

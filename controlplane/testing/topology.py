"""Declarative test topologies: network namespaces, veth links, bridges (with VLAN filtering),
VLAN and QinQ sub-interfaces, addresses and routes, built in a few ``ip -batch`` calls.

A description is plain frozen data, checked when it is built (one ``TopologyError`` naming
the field), so a typo fails before anything is created::

    ROUTER = Topology(
        namespaces={
            "lan": Netns(addresses={"eth0": "10.0.1.2/24"}, routes=[Route("default", "10.0.1.1")]),
            "router": Netns(forwarding=True, bridges=[Bridge("br0", ports=["lan0"])],
                            addresses={"br0": "10.0.1.1/24", "wan0": "192.0.2.1/24"}),
            "wan": Netns(addresses={"eth0": "192.0.2.2/24"}),
        },
        links=[Veth("lan:eth0", "router:lan0"), Veth("router:wan0", "wan:eth0")],
    )

Namespace names carry the run they belong to: ``otst-<pid>_<start>-<n>-<role>`` (the pid and
start time of the pytest process that made them), so parallel runs (``pytest -n``) never
share a name and a later run removes what a killed one (``kill -9``) left behind.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Literal

from controlplane.testing.shell import sh

NETNS_DIR = "/run/netns"
PREFIX = "otst"
# No "." in a name: reuseport pins live in a bpffs directory named after the namespace, and
# bpffs refuses names with a dot (EPERM).
_NAME = re.compile(rf"^{PREFIX}-(\d+)_([0-9a-z]+)-")
_DEV = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_ROLE = re.compile(r"^[a-z0-9][a-z0-9_]{0,15}$")


class TopologyError(ValueError):
    """The description is wrong (names the field); nothing was created."""


# --------------------------------------------------------------------------- description


def _dev(where: str, name: str) -> str:
    if not isinstance(name, str) or not _DEV.match(name):
        raise TopologyError(f"{where}: {name!r} is not a device name (1-15 of [A-Za-z0-9_.-])")
    return name


def _endpoint(where: str, text: str) -> tuple[str, str]:
    role, sep, dev = text.partition(":")
    if not sep or not _ROLE.match(role):
        raise TopologyError(f"{where}: {text!r} is not 'namespace:device'")
    return role, _dev(where, dev)


@dataclass(frozen=True)
class Veth:
    """A veth pair between two endpoints, each ``"namespace:device"`` (may be one namespace)."""

    a: str
    b: str

    def __post_init__(self) -> None:
        if _endpoint("veth", self.a) == _endpoint("veth", self.b):
            raise TopologyError(f"veth: both ends are {self.a!r}")

    @property
    def ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return _endpoint("veth", self.a), _endpoint("veth", self.b)


@dataclass(frozen=True)
class Vlan:
    """A VLAN sub-interface ``name`` on ``parent`` (a veth end, a bridge or another VLAN:
    QinQ is an 802.1Q VLAN on an 802.1ad one)."""

    name: str
    parent: str
    id: int
    protocol: Literal["802.1Q", "802.1ad"] = "802.1Q"

    def __post_init__(self) -> None:
        _dev("vlan", self.name)
        _dev(f"vlan {self.name}: parent", self.parent)
        if not isinstance(self.id, int) or not 1 <= self.id <= 4094:
            raise TopologyError(f"vlan {self.name}: id {self.id!r} is not in 1-4094")
        if self.protocol not in ("802.1Q", "802.1ad"):
            raise TopologyError(f"vlan {self.name}: protocol {self.protocol!r}: 802.1Q or 802.1ad")


@dataclass(frozen=True)
class Bridge:
    """A bridge (STP off, no forward delay) with ``ports``. With ``vlan_filtering``,
    ``tagged`` maps a port to the VLANs it carries tagged and ``untagged`` a port to its
    untagged PVID; the bridge itself joins every such VLAN (for an L3 ``br0.N``) and a
    listed port leaves the default VLAN 1 unless it is listed there."""

    name: str
    ports: Sequence[str] = ()
    vlan_filtering: bool = False
    tagged: Mapping[str, Sequence[int]] = field(default_factory=dict)
    untagged: Mapping[str, int] = field(default_factory=dict)
    address: str | None = None  # the bridge's own MAC (routers give their bridge one)

    def __post_init__(self) -> None:
        _dev("bridge", self.name)
        for port in self.ports:
            _dev(f"bridge {self.name}: port", port)
        if (self.tagged or self.untagged) and not self.vlan_filtering:
            raise TopologyError(f"bridge {self.name}: tagged/untagged need vlan_filtering=True")
        for port, vid in [(p, v) for p, vs in self.tagged.items() for v in vs] + list(
            self.untagged.items()
        ):
            if port not in self.ports:
                raise TopologyError(f"bridge {self.name}: VLAN port {port!r} is not in ports")
            if not isinstance(vid, int) or not 1 <= vid <= 4094:
                raise TopologyError(f"bridge {self.name}: port {port}: VLAN {vid!r} not 1-4094")

    def commands(self) -> list[str]:
        """``bridge -batch`` lines for the VLAN membership."""
        lines: list[str] = []
        vids: set[int] = set()
        for port in self.ports:
            mine = [*self.tagged.get(port, ())]
            if port in self.untagged:
                mine.append(self.untagged[port])
            if not mine:
                continue
            vids.update(mine)
            for vid in self.tagged.get(port, ()):
                lines.append(f"vlan add dev {port} vid {vid}")
            if port in self.untagged:
                lines.append(f"vlan add dev {port} vid {self.untagged[port]} pvid untagged")
            if 1 not in mine:
                lines.append(f"vlan del dev {port} vid 1")
        lines += [f"vlan add dev {self.name} vid {vid} self" for vid in sorted(vids)]
        return lines


@dataclass(frozen=True)
class Route:
    """``dest`` ("default", "default6" or a prefix) via ``via`` and/or out of ``dev``."""

    dest: str
    via: str | None = None
    dev: str | None = None

    def __post_init__(self) -> None:
        if self.dest not in ("default", "default6"):
            try:
                ipaddress.ip_network(self.dest)
            except ValueError:
                raise TopologyError(f"route {self.dest!r}: not a prefix or 'default'") from None
        if self.via is not None:
            try:
                ipaddress.ip_address(self.via)
            except ValueError:
                raise TopologyError(f"route {self.dest}: via {self.via!r} is no address") from None
        if self.via is None and self.dev is None:
            raise TopologyError(f"route {self.dest}: give via, dev or both")
        if self.dev is not None:
            _dev(f"route {self.dest}: dev", self.dev)

    def command(self) -> str:
        dest = "::/0" if self.dest == "default6" else self.dest  # ip infers v6 from "via"
        words = ["route", "add", dest]
        words += ["via", self.via] if self.via else []
        words += ["dev", self.dev] if self.dev else []
        return " ".join(words)


@dataclass(frozen=True)
class Netns:
    """One namespace: its bridges, VLANs, addresses (device -> one or more "addr/len"),
    routes and sysctls. ``forwarding`` turns on IPv4 and IPv6 forwarding (a router)."""

    forwarding: bool = False
    bridges: Sequence[Bridge] = ()
    vlans: Sequence[Vlan] = ()
    addresses: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    routes: Sequence[Route] = ()
    sysctls: Mapping[str, str | int] = field(default_factory=dict)

    def address_list(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for dev, addrs in self.addresses.items():
            for addr in [addrs] if isinstance(addrs, str) else addrs:
                try:
                    ipaddress.ip_interface(addr)
                except ValueError:
                    raise TopologyError(f"addresses[{dev}]: {addr!r} is not addr/len") from None
                if "/" not in addr:
                    raise TopologyError(f"addresses[{dev}]: {addr!r} needs a prefix length")
                out.append((_dev("addresses", dev), addr))
        return out


@dataclass(frozen=True)
class Topology:
    """Namespaces by role (the names tests use) and the veth links between them."""

    namespaces: Mapping[str, Netns]
    links: Sequence[Veth] = ()

    def check(self) -> None:
        """Every name resolves: roles, veth ends, VLAN parents (declared before use),
        bridge ports, address and route devices; no device declared twice."""
        if not self.namespaces:
            raise TopologyError("namespaces: at least one")
        for role in self.namespaces:
            if not _ROLE.match(role):
                raise TopologyError(f"namespaces: role {role!r} is not 1-16 of [a-z0-9_]")
        devices: dict[str, list[str]] = {role: ["lo"] for role in self.namespaces}

        def declare(role: str, dev: str, what: str) -> None:
            if dev in devices[role]:
                raise TopologyError(f"{what}: device {dev!r} declared twice in {role!r}")
            devices[role].append(dev)

        for link in self.links:
            for role, dev in link.ends:
                if role not in self.namespaces:
                    raise TopologyError(f"veth {link.a} - {link.b}: no namespace {role!r}")
                declare(role, dev, "veth")
        for role, ns in self.namespaces.items():
            for br in ns.bridges:
                declare(role, br.name, f"{role}: bridge")
            for vlan in ns.vlans:
                if vlan.parent not in devices[role]:
                    raise TopologyError(
                        f"{role}: vlan {vlan.name}: parent {vlan.parent!r} is not declared"
                        " (before it)"
                    )
                declare(role, vlan.name, f"{role}: vlan")
            for br in ns.bridges:
                for port in br.ports:
                    if port not in devices[role] or port == br.name:
                        raise TopologyError(f"{role}: bridge {br.name}: no port device {port!r}")
            for dev, _ in ns.address_list():
                if dev not in devices[role]:
                    raise TopologyError(f"{role}: addresses: no device {dev!r}")
            for route in ns.routes:
                if route.dev is not None and route.dev not in devices[role]:
                    raise TopologyError(f"{role}: route {route.dest}: no device {route.dev!r}")


# --------------------------------------------------------------------------- run names


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, base 36): a pid is reused, a
    (pid, start) pair is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return _b36(ticks)


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


_serial = count(1)


def run_token() -> str:
    """``<pid>_<start>`` of this process: the part of a name that says whose it is."""
    pid = os.getpid()
    return f"{pid}_{_start_time(pid)}"


def new_name(role: str) -> str:
    return f"{PREFIX}-{run_token()}-{next(_serial)}-{role}"


def owner_alive(name: str) -> bool:
    """Whether the process that made namespace NAME still runs (True for foreign names)."""
    m = _NAME.match(name)
    if m is None:
        return True
    return _start_time(int(m.group(1))) == m.group(2)


def ours(names: Iterable[str] | None = None) -> list[str]:
    """Existing namespaces made by this library (any run)."""
    if names is None:
        names = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
    return sorted(n for n in names if _NAME.match(n))


def remove_stale() -> list[str]:
    """Delete the namespaces of runs that are gone (``kill -9``, a crash); return them."""
    stale = [n for n in ours() if not owner_alive(n)]
    for name in stale:
        delete_namespace(name)
    return stale


def delete_namespace(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


# --------------------------------------------------------------------------- building


@dataclass
class Built:
    """A built topology: ``names[role]`` is the real namespace name."""

    topology: Topology
    names: dict[str, str]

    def __getitem__(self, role: str) -> str:
        try:
            return self.names[role]
        except KeyError:
            raise KeyError(f"no namespace {role!r} (have {', '.join(self.names)})") from None


def add_namespace(role: str, created: list[str]) -> str:
    """A fresh namespace (loopback up, no IPv6 DAD), appended to CREATED first so that a
    failure half-way still gets it deleted."""
    name = new_name(role)
    created.append(name)
    sh("ip", "netns", "add", name)
    sh(
        "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
        netns=name,
    )  # fmt: skip
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def _batch(tool: str, netns: str, lines: list[str]) -> None:
    if lines:
        sh(tool, "-n", netns, "-batch", "-", input="\n".join(lines) + "\n")


def build(topology: Topology, created: list[str]) -> Built:
    """Create TOPOLOGY; every namespace made is appended to CREATED (the caller deletes
    them, also when this raises)."""
    topology.check()
    names = {role: add_namespace(role, created) for role in topology.namespaces}
    for link in topology.links:
        (ra, da), (rb, db) = link.ends
        sh(
            "ip", "link", "add", da, "netns", names[ra], "type", "veth",
            "peer", "name", db, "netns", names[rb],
        )  # fmt: skip
    for role, ns in topology.namespaces.items():
        name = names[role]
        values = {f"net.{k}" if not k.startswith("net.") else k: v for k, v in ns.sysctls.items()}
        if ns.forwarding:
            values |= {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
        if values:
            sh("sysctl", "-qw", *(f"{k}={v}" for k, v in values.items()), netns=name)
        lines: list[str] = []
        for br in ns.bridges:
            mac = f" address {br.address}" if br.address else ""
            filtering = " vlan_filtering 1" if br.vlan_filtering else ""
            lines.append(f"link add {br.name}{mac} type bridge stp_state 0 forward_delay 0"
                         f"{filtering}")  # fmt: skip
        for vlan in ns.vlans:
            lines.append(
                f"link add link {vlan.parent} name {vlan.name} type vlan"
                f" protocol {vlan.protocol} id {vlan.id}"
            )
        lines += [f"link set {port} master {br.name}" for br in ns.bridges for port in br.ports]
        _batch("ip", name, lines)
        _batch("bridge", name, [c for br in ns.bridges for c in br.commands()])
        ends = [d for link in topology.links for r, d in link.ends if r == role]
        devices = [*ends, *(b.name for b in ns.bridges), *(v.name for v in ns.vlans)]
        lines = [
            f"addr add {addr} dev {dev}" + (" nodad" if ":" in addr else "")
            for dev, addr in ns.address_list()
        ]
        lines += [f"link set {dev} up" for dev in devices]
        lines += [route.command() for route in ns.routes]
        _batch("ip", name, lines)
    return Built(topology, names)

"""Test topologies and traffic/observation helpers for the VM suite.

Everything here runs inside the guest (root, Debian 6.1 kernel) and shells out to ``ip``,
``nft`` and ``conntrack``. Three network namespaces::

    ns1 (LAN host) eth0 ──veth── lan0 [nsr1: router] wan0 ──veth── eth0 ns2 (WAN host)

Addresses: LAN 10.0.1.0/24 + fd00:1::/64 (router .1 / ::1, ns1 .2 / ::2), WAN 10.0.2.0/24 +
fd00:2::/64 (router .1 / ::1, ns2 .2 / ::2). ns1 and ns2 route everything through the router;
the router forwards v4 and v6. What sits between ``lan0`` and the router's LAN address depends
on the topology kind (see ``KINDS``); ``Topology.flow_devices`` names the devices a flowtable
must list (the lower veths) and ``Topology.lan_dev`` the router's L3 device on the LAN side.

Traffic runs in-process: sockets are created in a namespace by a short-lived thread that
``setns()``-es into it (a socket keeps the namespace it was created in), so a transfer costs no
process start-up (slow under TCG).
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

MiB = 1024 * 1024

NS1 = "ns1"
NSR = "nsr1"
NS2 = "ns2"

#: Topology kinds, with the router's LAN-side layout.
KINDS = {
    "bridge": "seed: br0 (L3) with port lan0",
    "routed": "lan0 carries the LAN addresses (no bridge)",
    "vlan_port": "br0 (L3) with port lan0.10 (802.1Q 10 on lan0); ns1 uses eth0.10",
    "vlan_filtering": "vlan_filtering br0, lan0 tagged member of VLAN 10, L3 on br0.10; "
    "ns1 uses eth0.10",
    "qinq": "lan0.100 (802.1ad 100) / lan0.100.10 (802.1Q 10) carries the LAN addresses; "
    "ns1 uses eth0.100.10",
    "qinq_bridge": "br0 (L3) with port lan0.100.10 (802.1ad 100 + 802.1Q 10)",
}

T = TypeVar("T")


# --------------------------------------------------------------------------- commands


def run(*argv: str, check: bool = True, input: str | None = None) -> str:
    """Run a command, return stdout; raise with stderr on failure if CHECK."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc.stdout


def ns_run(ns: str, *argv: str, check: bool = True, input: str | None = None) -> str:
    """Run ARGV inside network namespace NS (``ip netns exec``), return stdout."""
    return run("ip", "netns", "exec", ns, *argv, check=check, input=input)


def ip_batch(ns: str | None, commands: list[str]) -> None:
    """Run several ``ip`` commands in one process (``ip -batch``), in NS if given."""
    if not commands:
        return
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    run(*argv, input="\n".join(commands) + "\n")


def sysctl(ns: str, **values: str | int) -> None:
    """Set sysctls in NS; keys use ``__`` for ``.`` (e.g. ``net__ipv4__ip_forward=1``)."""
    args = [f"{k.replace('__', '.')}={v}" for k, v in values.items()]
    ns_run(ns, "sysctl", "-q", "-w", *args)


# --------------------------------------------------------------------------- netns threads

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call FN in a thread switched into network namespace NS; return its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def netns_socket(
    ns: str, family: socket.AddressFamily, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket living in network namespace NS (usable from any thread)."""
    return in_netns(ns, lambda: socket.socket(family, kind))


def tcp_listen(ns: str, addr: str, port: int = 0) -> socket.socket:
    """A listening TCP socket in NS bound to ADDR:PORT (PORT 0 = any free port)."""
    fam = _family(addr)
    srv = netns_socket(ns, fam)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(16)
    return srv


def tcp_connect(ns: str, addr: str, port: int, timeout: float = 20.0) -> socket.socket:
    """A TCP socket in NS connected to ADDR:PORT."""
    sock = netns_socket(ns, _family(addr))
    sock.settimeout(timeout)
    sock.connect((addr, port))
    return sock


# --------------------------------------------------------------------------- topologies


@dataclass
class Topology:
    """A built topology; names and addresses to use in configs and assertions."""

    kind: str
    lan_dev: str  # router's L3 device on the LAN side (carries 10.0.1.1 / fd00:1::1)
    ns1_dev: str  # ns1's L3 device (carries 10.0.1.2 / fd00:1::2)
    bridge: str | None = None  # "br0" when the LAN side is bridged
    bridge_ports: tuple[str, ...] = ()
    vlan_devices: tuple[str, ...] = ()  # VLAN devices created in nsr1
    ns1: str = NS1
    router: str = NSR
    ns2: str = NS2
    lan_port: str = "lan0"  # nsr1 veth toward ns1
    wan_dev: str = "wan0"  # nsr1 veth toward ns2 (carries 10.0.2.1 / fd00:2::1)
    ns2_dev: str = "eth0"
    flow_devices: tuple[str, ...] = ("lan0", "wan0")  # devices a flowtable must list
    addrs: dict[str, str] = field(
        default_factory=lambda: {
            "ns1_v4": "10.0.1.2",
            "ns1_v6": "fd00:1::2",
            "lan_v4": "10.0.1.1",
            "lan_v6": "fd00:1::1",
            "wan_v4": "10.0.2.1",
            "wan_v6": "fd00:2::1",
            "ns2_v4": "10.0.2.2",
            "ns2_v6": "fd00:2::2",
        }
    )

    def addr(self, who: Literal["ns1", "lan", "wan", "ns2"], v: Literal[4, 6] = 4) -> str:
        """Address of WHO ("ns1", "lan" = router LAN side, "wan" = router WAN side, "ns2")."""
        return self.addrs[f"{who}_v{v}"]

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.ns1, self.router, self.ns2)

    def teardown(self) -> None:
        delete_namespaces(self.namespaces)

    def ping(self, v: Literal[4, 6] = 4, timeout: float = 1.0) -> bool:
        """One ICMP echo ns1 → ns2 through the router; True if answered."""
        return ping(self.ns1, self.addr("ns2", v), timeout)


def delete_namespaces(names: tuple[str, ...] | list[str] = (NS1, NSR, NS2)) -> None:
    existing = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    for name in names:
        if name in existing:
            run("ip", "netns", "delete", name, check=False)


def _l3(dev: str, v4: str, v6: str) -> list[str]:
    return [
        f"addr add {v4}/24 dev {dev}",
        f"addr add {v6}/64 dev {dev} nodad",
        f"link set {dev} up",
    ]


def build_topology(kind: str = "bridge", *, check: bool = True) -> Topology:
    """Create ns1, nsr1, ns2 wired as KIND (see ``KINDS``); ping through it if CHECK.

    Existing namespaces with these names are deleted first.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown topology kind {kind!r}; known: {', '.join(KINDS)}")
    delete_namespaces()
    topo = _layout(kind)
    a = topo.addrs
    for ns in topo.namespaces:
        run("ip", "netns", "add", ns)
        # No duplicate address detection (addresses usable at once), loopback up.
        sysctl(ns, net__ipv6__conf__all__accept_dad=0, net__ipv6__conf__default__accept_dad=0)
        ip_batch(ns, ["link set lo up"])
    sysctl(topo.router, net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
    run(
        "ip", "link", "add", "lan0", "netns", topo.router, "type", "veth",
        "peer", "name", "eth0", "netns", topo.ns1,
    )  # fmt: skip
    run(
        "ip", "link", "add", "wan0", "netns", topo.router, "type", "veth",
        "peer", "name", "eth0", "netns", topo.ns2,
    )  # fmt: skip

    r: list[str] = ["link set lan0 up", *_l3("wan0", a["wan_v4"], a["wan_v6"])]
    h1: list[str] = ["link set eth0 up"]
    if kind == "bridge":
        r += _bridge("lan0")
    elif kind == "routed":
        pass
    elif kind == "vlan_port":
        r += ["link add link lan0 name lan0.10 type vlan id 10", "link set lan0.10 up"]
        r += _bridge("lan0.10")
        h1 += ["link add link eth0 name eth0.10 type vlan id 10"]
    elif kind == "vlan_filtering":
        r += [
            "link add br0 type bridge vlan_filtering 1 stp_state 0 forward_delay 0",
            "link set lan0 master br0",
            "link set br0 up",
        ]
        h1 += ["link add link eth0 name eth0.10 type vlan id 10"]
    elif kind in ("qinq", "qinq_bridge"):
        r += [
            "link add link lan0 name lan0.100 type vlan protocol 802.1ad id 100",
            "link set lan0.100 up",
            "link add link lan0.100 name lan0.100.10 type vlan protocol 802.1Q id 10",
            "link set lan0.100.10 up",
        ]
        if kind == "qinq_bridge":
            r += _bridge("lan0.100.10")
        h1 += [
            "link add link eth0 name eth0.100 type vlan protocol 802.1ad id 100",
            "link set eth0.100 up",
            "link add link eth0.100 name eth0.100.10 type vlan protocol 802.1Q id 10",
        ]
    if kind != "vlan_filtering":  # br0.10 comes after the bridge VLAN set-up below
        r += _l3(topo.lan_dev, a["lan_v4"], a["lan_v6"])
    ip_batch(topo.router, r)
    if kind == "vlan_filtering":
        run(
            "ip", "netns", "exec", topo.router, "bridge", "-batch", "-",
            input="vlan add dev lan0 vid 10\nvlan del dev lan0 vid 1\n"
            "vlan add dev br0 vid 10 self\n",
        )  # fmt: skip
        ip_batch(
            topo.router,
            [
                "link add link br0 name br0.10 type vlan id 10",
                *_l3("br0.10", a["lan_v4"], a["lan_v6"]),
            ],
        )
    h1 += _l3(topo.ns1_dev, a["ns1_v4"], a["ns1_v6"])
    h1 += [f"route add default via {a['lan_v4']}", f"route add ::/0 via {a['lan_v6']}"]
    ip_batch(topo.ns1, h1)
    h2 = _l3("eth0", a["ns2_v4"], a["ns2_v6"])
    h2 += [f"route add default via {a['wan_v4']}", f"route add ::/0 via {a['wan_v6']}"]
    ip_batch(topo.ns2, h2)
    if check:
        wait_connectivity(topo)
    return topo


def _bridge(port: str) -> list[str]:
    return [
        "link add br0 type bridge stp_state 0 forward_delay 0",
        f"link set {port} master br0",
        "link set br0 up",
    ]


def _layout(kind: str) -> Topology:
    if kind == "bridge":
        return Topology(kind, "br0", "eth0", bridge="br0", bridge_ports=("lan0",))
    if kind == "routed":
        return Topology(kind, "lan0", "eth0")
    if kind == "vlan_port":
        return Topology(
            kind, "br0", "eth0.10", bridge="br0", bridge_ports=("lan0.10",),
            vlan_devices=("lan0.10",),
        )  # fmt: skip
    if kind == "vlan_filtering":
        return Topology(
            kind, "br0.10", "eth0.10", bridge="br0", bridge_ports=("lan0",),
            vlan_devices=("br0.10",),
        )  # fmt: skip
    if kind == "qinq":
        return Topology(
            kind, "lan0.100.10", "eth0.100.10", vlan_devices=("lan0.100", "lan0.100.10")
        )
    return Topology(
        kind, "br0", "eth0.100.10", bridge="br0", bridge_ports=("lan0.100.10",),
        vlan_devices=("lan0.100", "lan0.100.10"),
    )  # fmt: skip


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ping(ns: str, addr: str, timeout: float = 1.0) -> bool:
    """Send one ICMP/ICMPv6 echo request from NS to ADDR; True if the reply came back.

    Raw sockets in-process: no ping binary needed (iputils-ping is not installed here).
    """
    v6 = _family(addr) == socket.AF_INET6
    fam, proto = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    )
    sock = in_netns(ns, lambda: socket.socket(fam, socket.SOCK_RAW, proto))
    ident = os.getpid() & 0xFFFF
    seq = int(time.monotonic() * 1000) & 0xFFFF
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    payload = b"vmtest-ping"
    hdr = struct.pack("!BBHHH", req_type, 0, 0, ident, seq)
    if not v6:  # the kernel fills in the ICMPv6 checksum itself
        hdr = struct.pack("!BBHHH", req_type, 0, _checksum(hdr + payload), ident, seq)
    try:
        sock.sendto(hdr + payload, (addr, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(2048)
            except (TimeoutError, OSError):
                return False
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if typ == rep_type and rid == ident and rseq == seq:
                return True
        return False
    finally:
        sock.close()


def wait_connectivity(topo: Topology, timeout: float = 10.0) -> None:
    """Wait until ns1 reaches ns2 over v4 and v6 through the router (before any ruleset)."""
    deadline = time.monotonic() + timeout
    for v in (4, 6):  # type: Literal[4, 6]
        while not topo.ping(v, timeout=0.5):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topo.kind}: ns1 cannot reach ns2 over IPv{v}")


# --------------------------------------------------------------------------- transfers


def _payload_block(size: int) -> bytes:
    return os.urandom(size)


@dataclass
class TransferResult:
    size: int
    received: int
    sha_sent: str
    sha_received: str
    seconds: float
    client: tuple[str, int]  # client socket's local address (the conntrack orig source)
    server: tuple[str, int]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.received == self.size and self.intact

    @property
    def intact(self) -> bool:
        return self.sha_sent == self.sha_received

    @property
    def mbit_s(self) -> float:
        return self.received * 8 / 1e6 / self.seconds if self.seconds > 0 else 0.0


class TcpTransfer:
    """One TCP connection from CLIENT_NS to SERVER_ADDR (listening in SERVER_NS) carrying SIZE
    random bytes, sha256-checked.

    ``direction="download"``: server → client (e.g. ns2 → ns1 when ns1 connects out);
    ``"upload"``: client → server. After the data has arrived the connection stays open (so a
    test can look at conntrack while the flow is still offloaded) until ``close()``::

        with TcpTransfer(NS1, NS2, "10.0.2.2", 8 * MiB) as t:
            res = t.wait()
            assert res.ok
            entries = find_conntrack(NSR, sport=res.client[1], dport=res.server[1])
    """

    def __init__(
        self,
        client_ns: str,
        server_ns: str,
        server_addr: str,
        size: int = 8 * MiB,
        *,
        direction: Literal["download", "upload"] = "download",
        port: int = 0,
        chunk: int = 256 * 1024,
        timeout: float = 120.0,
    ) -> None:
        self.client_ns, self.server_ns, self.server_addr = client_ns, server_ns, server_addr
        self.size, self.direction, self.port = size, direction, port
        self.chunk, self.timeout = chunk, timeout
        self._data = _payload_block(size)
        self._sha_sent = hashlib.sha256(self._data).hexdigest()
        self._sha = hashlib.sha256()
        self._received = 0
        self._error: str | None = None
        self._done = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0
        self._t1 = 0.0
        self.client: tuple[str, int] = ("", 0)
        self.server: tuple[str, int] = ("", 0)

    def start(self) -> TcpTransfer:
        srv = tcp_listen(self.server_ns, self.server_addr, self.port)
        srv.settimeout(self.timeout)
        self._sockets.append(srv)
        port = srv.getsockname()[1]
        cli = tcp_connect(self.client_ns, self.server_addr, port, timeout=self.timeout)
        conn, _ = srv.accept()
        conn.settimeout(self.timeout)
        self._sockets += [cli, conn]
        self.client = cli.getsockname()[:2]
        self.server = (self.server_addr, port)
        sender, receiver = (conn, cli) if self.direction == "download" else (cli, conn)
        self._t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._send, args=(sender,), daemon=True),
            threading.Thread(target=self._recv, args=(receiver,), daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _send(self, sock: socket.socket) -> None:
        view = memoryview(self._data)
        try:
            for off in range(0, self.size, self.chunk):
                sock.sendall(view[off : off + self.chunk])
        except OSError as exc:
            self._fail(f"send: {exc!r}")

    def _recv(self, sock: socket.socket) -> None:
        try:
            while self._received < self.size:
                data = sock.recv(min(1024 * 1024, self.size - self._received))
                if not data:
                    self._fail(f"recv: EOF after {self._received} of {self.size} bytes")
                    return
                self._sha.update(data)
                self._received += len(data)
        except OSError as exc:
            self._fail(f"recv: {exc!r}")
        finally:
            self._t1 = time.monotonic()
            self._done.set()

    def _fail(self, msg: str) -> None:
        if self._error is None:
            self._error = msg
        self._done.set()

    @property
    def received(self) -> int:
        return self._received

    def wait(self, timeout: float | None = None) -> TransferResult:
        """Wait until all data arrived (or failed); the connection stays open."""
        if not self._done.wait(self.timeout if timeout is None else timeout):
            self._fail(f"timeout: {self._received} of {self.size} bytes arrived")
        return self.result()

    def result(self) -> TransferResult:
        return TransferResult(
            size=self.size,
            received=self._received,
            sha_sent=self._sha_sent,
            sha_received=self._sha.hexdigest(),
            seconds=(self._t1 or time.monotonic()) - self._t0,
            client=self.client,
            server=self.server,
            error=self._error,
        )

    def close(self) -> TransferResult:
        for s in self._sockets:
            s.close()
        for t in self._threads:
            t.join(timeout=5)
        return self.result()

    def __enter__(self) -> TcpTransfer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def tcp_transfer(
    client_ns: str,
    server_ns: str,
    server_addr: str,
    size: int = 8 * MiB,
    *,
    direction: Literal["download", "upload"] = "download",
    before_close: Callable[[TransferResult], None] | None = None,
    timeout: float = 120.0,
) -> TransferResult:
    """Run a whole ``TcpTransfer``; call BEFORE_CLOSE(result) while the connection is open."""
    with TcpTransfer(
        client_ns, server_ns, server_addr, size, direction=direction, timeout=timeout
    ) as t:
        res = t.wait()
        if before_close is not None:
            before_close(res)
    return res


@dataclass
class StreamResult:
    sent: int
    received: int
    seconds: float
    client: tuple[str, int]
    server: tuple[str, int]
    mismatch_at: int | None  # first byte offset that differed, if any
    error: str | None

    @property
    def intact(self) -> bool:
        return self.error is None and self.mismatch_at is None and self.sent == self.received


class TcpStream:
    """A long-running background TCP stream (patterned data, verified as it arrives).

    Sends until ``stop()``; optional RATE in bytes/s. ``stop()`` half-closes the sender, lets
    the receiver drain to EOF and returns a ``StreamResult`` (``intact`` = no error, no
    corrupted byte, everything sent arrived)::

        s = TcpStream(NS1, NS2, "10.0.2.2").start()
        s.wait_received(1 * MiB)
        ...  # change the router's configuration
        assert s.stop().intact
    """

    PATTERN = 65521  # prime length: chunk boundaries drift through the pattern

    def __init__(
        self,
        client_ns: str,
        server_ns: str,
        server_addr: str,
        *,
        direction: Literal["download", "upload"] = "download",
        port: int = 0,
        rate: float | None = None,
        chunk: int = 64 * 1024,
        timeout: float = 60.0,
    ) -> None:
        self.client_ns, self.server_ns, self.server_addr = client_ns, server_ns, server_addr
        self.direction, self.port, self.rate = direction, port, rate
        self.chunk, self.timeout = min(chunk, self.PATTERN), timeout
        block = os.urandom(self.PATTERN)
        self._pattern = memoryview(block + block)
        self.sent = 0
        self.received = 0
        self._mismatch: int | None = None
        self._error: str | None = None
        self._stop = threading.Event()
        self._eof = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._sender: socket.socket | None = None
        self._t0 = 0.0
        self.client: tuple[str, int] = ("", 0)
        self.server: tuple[str, int] = ("", 0)

    def start(self) -> TcpStream:
        srv = tcp_listen(self.server_ns, self.server_addr, self.port)
        srv.settimeout(self.timeout)
        port = srv.getsockname()[1]
        cli = tcp_connect(self.client_ns, self.server_addr, port, timeout=self.timeout)
        conn, _ = srv.accept()
        srv.close()
        conn.settimeout(self.timeout)
        self._sockets = [cli, conn]
        self.client = cli.getsockname()[:2]
        self.server = (self.server_addr, port)
        sender, receiver = (conn, cli) if self.direction == "download" else (cli, conn)
        self._sender = sender
        self._t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._send, args=(sender,), daemon=True),
            threading.Thread(target=self._recv, args=(receiver,), daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _send(self, sock: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                off = self.sent % self.PATTERN
                n = sock.send(self._pattern[off : off + self.chunk])
                self.sent += n
                if self.rate:
                    ahead = self.sent / self.rate - (time.monotonic() - self._t0)
                    if ahead > 0:
                        self._stop.wait(ahead)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._error = self._error or f"send: {exc!r}"

    def _recv(self, sock: socket.socket) -> None:
        try:
            while True:
                data = sock.recv(256 * 1024)
                if not data:
                    break
                if self._mismatch is None:
                    self._check(data)
                self.received += len(data)
        except OSError as exc:
            self._error = self._error or f"recv: {exc!r}"
        finally:
            self._eof.set()

    def _check(self, data: bytes) -> None:
        pos, view = 0, memoryview(data)
        while pos < len(data):
            off = (self.received + pos) % self.PATTERN
            n = min(len(data) - pos, self.PATTERN)
            if view[pos : pos + n] != self._pattern[off : off + n]:
                exp = self._pattern[off : off + n]
                i = next(i for i in range(n) if view[pos + i] != exp[i])
                self._mismatch = self.received + pos + i
                return
            pos += n

    def wait_received(self, nbytes: int, timeout: float | None = None) -> None:
        """Block until at least NBYTES arrived (raises TimeoutError / on stream error)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self.received < nbytes:
            if self._error or self._eof.is_set():
                raise RuntimeError(f"stream ended early: {self._error or 'EOF'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream: {self.received} of {nbytes} bytes arrived")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self._error is None and not self._eof.is_set()

    def stop(self, timeout: float | None = None) -> StreamResult:
        """Stop sending, drain, close; return the result."""
        self._stop.set()
        self._threads[0].join(timeout=self.timeout if timeout is None else timeout)
        self._eof.wait(self.timeout if timeout is None else timeout)
        for s in self._sockets:
            s.close()
        for t in self._threads:
            t.join(timeout=5)
        return StreamResult(
            sent=self.sent,
            received=self.received,
            seconds=time.monotonic() - self._t0,
            client=self.client,
            server=self.server,
            mismatch_at=self._mismatch,
            error=self._error,
        )

    def __enter__(self) -> TcpStream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._threads:
            self.stop()


# --------------------------------------------------------------------------- conntrack


@dataclass
class CtEntry:
    """One ``conntrack -L`` line."""

    proto: str
    orig: dict[str, str]  # src, dst, sport, dport of the original direction
    reply: dict[str, str]  # same keys, reply direction
    flags: frozenset[str]  # e.g. {"OFFLOAD", "ASSURED"}
    fields: dict[str, str]  # everything else key=value (id, mark, zone, use, ...)
    state: str | None  # TCP state (ESTABLISHED, ...) if printed
    raw: str

    @property
    def offloaded(self) -> bool:
        return "OFFLOAD" in self.flags or "HW_OFFLOAD" in self.flags

    @property
    def id(self) -> str | None:
        return self.fields.get("id")


_TUPLE_KEYS = ("src", "dst", "sport", "dport")


def parse_conntrack_line(line: str) -> CtEntry | None:
    parts = line.split()
    if len(parts) < 3:
        return None
    proto = parts[0]
    orig: dict[str, str] = {}
    reply: dict[str, str] = {}
    fields: dict[str, str] = {}
    flags: set[str] = set()
    state = None
    for tok in parts[1:]:
        if tok.startswith("[") and tok.endswith("]"):
            flags.add(tok[1:-1])
        elif "=" in tok:
            k, v = tok.split("=", 1)
            if k in _TUPLE_KEYS:
                (reply if k in orig else orig)[k] = v
            else:
                fields.setdefault(k, v)
        elif tok.isupper():
            state = tok
    return CtEntry(proto, orig, reply, frozenset(flags), fields, state, line)


def conntrack_list(ns: str, *, family: Literal[4, 6] = 4, proto: str = "tcp") -> list[CtEntry]:
    """All conntrack entries of PROTO/FAMILY in NS (``conntrack -L -o id``)."""
    out = ns_run(
        ns, "conntrack", "-L", "-f", "ipv6" if family == 6 else "ipv4", "-p", proto, "-o", "id"
    )
    return [e for e in map(parse_conntrack_line, out.splitlines()) if e is not None]


def _norm(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr


def find_conntrack(
    ns: str,
    *,
    src: str | None = None,
    dst: str | None = None,
    sport: int | None = None,
    dport: int | None = None,
    proto: str = "tcp",
    family: Literal[4, 6] | None = None,
) -> list[CtEntry]:
    """Entries whose ORIGINAL tuple matches every given field (family guessed from addrs)."""
    if family is None:
        known = src or dst
        family = 6 if known and ipaddress.ip_address(known).version == 6 else 4
    want = {
        k: _norm(str(v))
        for k, v in (("src", src), ("dst", dst), ("sport", sport), ("dport", dport))
        if v is not None
    }
    return [
        e
        for e in conntrack_list(ns, family=family, proto=proto)
        if all(_norm(e.orig.get(k, "")) == v for k, v in want.items())
    ]


def offloaded_entries(ns: str, **tuple_fields: Any) -> list[CtEntry]:
    """``find_conntrack`` filtered to [OFFLOAD] entries."""
    return [e for e in find_conntrack(ns, **tuple_fields) if e.offloaded]


def flow_entries(ns: str, res: TransferResult | StreamResult | Any) -> list[CtEntry]:
    """Conntrack entries in NS for the connection of a transfer/stream (by its orig tuple)."""
    return find_conntrack(
        ns, src=res.client[0], sport=res.client[1], dst=res.server[0], dport=res.server[1]
    )


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll PREDICATE until it returns something truthy (returned); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def wait_offloaded(ns: str, flow: Any, timeout: float = 10.0) -> CtEntry:
    """Wait until the conntrack entry of FLOW (a transfer, stream or result) is [OFFLOAD]."""
    return wait_for(
        lambda: next((e for e in flow_entries(ns, flow) if e.offloaded), None),
        timeout,
        what=f"[OFFLOAD] for {flow.client} -> {flow.server} in {ns}",
    )


# --------------------------------------------------------------------------- nftables


@dataclass(frozen=True)
class Counter:
    packets: int
    bytes: int


def nft(ns: str, *args: str) -> str:
    """``nft ARGS`` in NS; returns stdout."""
    return ns_run(ns, "nft", *args)


def nft_apply(ns: str, ruleset: str) -> None:
    """Load RULESET text in NS in one transaction (``nft -f -``)."""
    ns_run(ns, "nft", "-f", "-", input=ruleset)


def nft_json(ns: str, *args: str) -> list[dict[str, Any]]:
    """``nft -j ARGS`` in NS, returns the ``nftables`` list."""
    return json.loads(nft(ns, "-j", *args))["nftables"]  # type: ignore[no-any-return]


def nft_counter(ns: str, table: str, name: str, family: str = "inet") -> Counter:
    """Value of the named counter object FAMILY TABLE NAME in NS."""
    for item in nft_json(ns, "list", "counter", family, table, name):
        if "counter" in item:
            c = item["counter"]
            return Counter(int(c["packets"]), int(c["bytes"]))
    raise LookupError(f"counter {family} {table} {name} not found in {ns}")


OBSERVER_TABLE = "observer"


def add_observer(
    ns: str = NSR,
    *,
    counter: str = "fwd_tcp",
    match: str = "meta l4proto tcp",
    priority: int = -300,
    table: str = OBSERVER_TABLE,
) -> None:
    """A separate ``inet TABLE`` with a forward-hook chain counting MATCH into COUNTER.

    Offloaded packets skip the forward hook entirely (in every table), so this counter shows
    how many packets took the classic path regardless of what the project's table does.
    Calling it again for another COUNTER adds that counter and rule.
    """
    nft_apply(
        ns,
        f"""
table inet {table} {{
    counter {counter} {{ }}
    chain forward {{
        type filter hook forward priority {priority}; policy accept;
        {match} counter name "{counter}"
    }}
}}
""",
    )


def observer_counter(
    ns: str = NSR, counter: str = "fwd_tcp", table: str = OBSERVER_TABLE
) -> Counter:
    return nft_counter(ns, table, counter)


def reset_counter(ns: str, table: str, name: str, family: str = "inet") -> None:
    nft(ns, "reset", "counter", family, table, name)


# --------------------------------------------------------------------------- project config


class ProjectRuleset:
    """The project's config with flowtable ``ft`` (FLOWTABLE: its devices/bridges) and one
    TCP+UDP policy, applied to NS through the real apply, with or without masquerade on
    MASQUERADE; applied again only when that changes (an apply costs seconds under TCG)."""

    def __init__(self, ns: str, flowtable: dict[str, Any], masquerade: str) -> None:
        self.ns, self.flowtable, self.masquerade = ns, flowtable, masquerade
        self.nat: bool | None = None

    def use(self, *, nat: bool) -> None:
        if self.nat == nat:
            return
        from controlplane.loader import parse_config
        from controlplane.service.ruleset import apply

        cfg: dict[str, Any] = {
            "version": 1,
            "flowtables": [{"name": "ft", **self.flowtable}],
            "policies": [{"name": "all", "flowtable": "ft", "protocols": ["tcp", "udp"]}],
        }
        if nat:
            cfg["nat"] = {"masquerade": [{"oifname": self.masquerade}]}
        apply(parse_config(cfg), self.ns)
        self.nat = nat


# --------------------------------------------------------------------------- project CLI


def offloadctl(
    *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run the project's CLI with this interpreter (``python -m controlplane.cli ARGS``).

    E.g. ``offloadctl("apply", str(config_path), "--netns", NSR)``. Python start-up plus the
    project's imports cost seconds under TCG: prefer few calls per test.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"offloadctl {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


# --------------------------------------------------------------------------- switched LAN
# (cache invalidation, issue 8: a host moving between two ports of the router's bridge)

NSA = NS1  # host A, behind the switch
NSSW = "nssw"  # the "switch": bridge swbr with A's cable and two uplinks
NSG = "nsg"  # gateway G on br0 port p3 (route-change scenario)
NSC = "nsc"  # host C on a plain routed port (neighbour-transmit control)
BR0_MAC = "02:00:00:00:01:01"  # the router's br0


@dataclass
class SwitchedTopology:
    """A (ns1) ── switch (nssw: swbr) ══ up1/up2 ══ p1/p2 of br0 [nsr1] wan0 ── B (ns2)::

        ns1 eth0 ── swa [swbr] up1 ── p1 ┐
                               up2 ── p2 ┼ br0 10.0.1.1/24   wan0 10.0.2.1 ── eth0 ns2 (B)
        nsg eth0 10.0.1.3 ────────── p3 ┘                    lanc 10.0.3.1 ── eth0 nsc (C)

    Exactly one uplink is in swbr at a time (two would make a loop: no STP); ``move()``
    swaps them, so A's MAC appears on the other port of br0 as soon as A sends a frame.
    A holds 10.0.1.2 on eth0 and 10.0.9.1 on lo; the router routes 10.0.9.0/24 via G
    (10.0.1.3), which forwards it to A. IPv6 is off everywhere (no stray frames from A:
    the first frame A sends after a move is the one the test sends).
    """

    uplink: int = 1  # which of up1/up2 is in swbr
    a_ip: str = "10.0.1.2"
    a_service: str = "10.0.9.1"
    g_ip: str = "10.0.1.3"
    b_ip: str = "10.0.2.2"
    c_ip: str = "10.0.3.2"
    lan_ip: str = "10.0.1.1"
    namespaces: tuple[str, ...] = (NSA, NSSW, NSR, NS2, NSG, NSC)

    @property
    def port(self) -> str:
        """br0's port that currently leads to A."""
        return f"p{self.uplink}"

    def a_mac(self) -> str:
        return link_mac(NSA, "eth0")

    def move(self) -> str:
        """Re-cable the switch to the other uplink (one ``ip -batch``); returns the new port."""
        old, new = self.uplink, 3 - self.uplink
        ip_batch(NSSW, [f"link set up{old} nomaster", f"link set up{new} master swbr"])
        self.uplink = new
        return self.port

    def teardown(self) -> None:
        delete_namespaces(self.namespaces)


def link_mac(ns: str, dev: str) -> str:
    data = json.loads(run("ip", "-n", ns, "-j", "link", "show", "dev", dev))
    return str(data[0]["address"])


def fdb_port(ns: str, bridge: str, mac: str) -> str | None:
    """The port of BRIDGE in NS that MAC is learned on (``bridge fdb``), if any."""
    out = run("bridge", "-n", ns, "-j", "fdb", "show", "br", bridge)
    for entry in json.loads(out or "[]"):
        if entry.get("mac") == mac.lower() and "master" in entry:
            return str(entry["ifname"])
    return None


def build_switched() -> SwitchedTopology:
    """Create the switched topology (see ``SwitchedTopology``); ping A and C from B."""
    topo = SwitchedTopology()
    delete_namespaces(list(topo.namespaces))
    for ns in topo.namespaces:
        run("ip", "netns", "add", ns)
        sysctl(ns, net__ipv6__conf__all__disable_ipv6=1, net__ipv6__conf__default__disable_ipv6=1)
        ip_batch(ns, ["link set lo up"])
    sysctl(NSR, net__ipv4__ip_forward=1)
    sysctl(NSG, net__ipv4__ip_forward=1, net__ipv4__conf__all__send_redirects=0)
    sysctl(NSG, net__ipv4__conf__default__send_redirects=0)
    pairs = [
        ("eth0", NSA, "swa", NSSW),
        ("up1", NSSW, "p1", NSR),
        ("up2", NSSW, "p2", NSR),
        ("eth0", NSG, "p3", NSR),
        ("eth0", NS2, "wan0", NSR),
        ("eth0", NSC, "lanc", NSR),
    ]
    for a, ns_a, b, ns_b in pairs:
        run("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)
    ip_batch(
        NSSW,
        [
            "link add swbr type bridge stp_state 0 forward_delay 0",
            "link set swa master swbr up",
            "link set up1 master swbr up",
            "link set up2 up",
            "link set swbr up",
        ],
    )
    ip_batch(
        NSR,
        [
            # A MAC of its own, as routers' bridges have: with an inherited one (p1's, the
            # lowest) removing p1 changes the router's MAC, flushes its neighbours and
            # leaves p1 owning the old router MAC, so A (still cabled to p1) is routed
            # through the detached p1 and the flowtable re-offloads the flow there
            # (nft_flow_route looks the return route up with oif = input device: "on
            # link"); once A moves that cached path stalls (seen in the VM, port_removed).
            f"link add br0 address {BR0_MAC} type bridge stp_state 0 forward_delay 0",
            *(f"link set {p} master br0 up" for p in ("p1", "p2", "p3")),
            "link set br0 up",
            f"addr add {topo.lan_ip}/24 dev br0",
            "addr add 10.0.2.1/24 dev wan0",
            "link set wan0 up",
            "addr add 10.0.3.1/24 dev lanc",
            "link set lanc up",
            f"route add 10.0.9.0/24 via {topo.g_ip}",
        ],
    )
    ip_batch(
        NSA,
        [
            f"addr add {topo.a_ip}/24 dev eth0",
            f"addr add {topo.a_service}/32 dev lo",
            "link set eth0 up",
            f"route add default via {topo.lan_ip}",
        ],
    )
    ip_batch(
        NSG,
        [
            f"addr add {topo.g_ip}/24 dev eth0",
            "link set eth0 up",
            f"route add 10.0.9.0/24 via {topo.a_ip}",
        ],
    )
    ip_batch(NS2, [f"addr add {topo.b_ip}/24 dev eth0", "link set eth0 up",
                   "route add default via 10.0.2.1"])  # fmt: skip
    ip_batch(NSC, [f"addr add {topo.c_ip}/24 dev eth0", "link set eth0 up",
                   "route add default via 10.0.3.1"])  # fmt: skip
    for target in (topo.a_ip, topo.a_service, topo.c_ip):
        wait_for(partial(ping, NS2, target, 0.5), timeout=15, what=f"B reaches {target}")
    return topo


ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def announce(ns: str, dev: str, ip: str, mac: str | None = None) -> float:
    """Send one gratuitous ARP for IP from DEV in NS (what a migrated VM or a roaming station
    sends); returns ``time.time()`` taken just before sending."""
    mac = mac or link_mac(ns, dev)
    sock = in_netns(ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
    try:
        sock.bind((dev, 0))
        hw, addr = _mac_bytes(mac), socket.inet_aton(ip)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + b"\0" * 6 + addr
        frame = b"\xff" * 6 + hw + struct.pack("!H", 0x0806) + arp + b"\0" * 18
        t = time.time()
        sock.send(frame)
        return t
    finally:
        sock.close()


@dataclass(frozen=True)
class Frame:
    """One captured frame: kernel receive/transmit time (CLOCK_REALTIME, ``time.time()``)."""

    ts: float
    outgoing: bool
    src_mac: str
    dst_mac: str
    ethertype: int
    src: str = ""
    dst: str = ""
    proto: int = 0
    sport: int = 0  # TCP/UDP ports (IPv4 without options)
    dport: int = 0


class FrameCapture:
    """AF_PACKET capture on DEV in NS with kernel timestamps (SO_TIMESTAMPNS), in a thread.

    Keeps at most LIMIT frames (the first ones: what the tests time is the first frame of a
    kind after an event). The timestamps are the kernel's, so Python's scheduling under TCG
    does not enter the measurement.
    """

    def __init__(self, ns: str, dev: str, limit: int = 20_000) -> None:
        self.ns, self.dev, self.limit = ns, dev, limit
        self.frames: list[Frame] = []
        self._stop = threading.Event()
        self._sock = in_netns(
            ns,
            lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)),
        )
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((dev, ETH_P_ALL))
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"capture-{dev}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = self._sock.recvmsg(256, socket.CMSG_SPACE(16))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            # A packet socket hears every device from socket() until bind(): those
            # first frames are not this device's.
            if len(self.frames) >= self.limit or len(data) < 14 or addr[0] != self.dev:
                continue
            ts = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    ts = sec + nsec / 1e9
            ethertype = struct.unpack("!H", data[12:14])[0]
            src = dst = ""
            proto = sport = dport = 0
            if ethertype == 0x0800 and len(data) >= 34:
                proto = data[23]
                src, dst = socket.inet_ntoa(data[26:30]), socket.inet_ntoa(data[30:34])
                if proto in (6, 17) and data[14] == 0x45 and len(data) >= 38:
                    sport, dport = struct.unpack("!HH", data[34:38])
            elif ethertype == 0x0806 and len(data) >= 42:
                src, dst = socket.inet_ntoa(data[28:32]), socket.inet_ntoa(data[38:42])
            self.frames.append(
                Frame(
                    ts, addr[2] == PACKET_OUTGOING, _mac_text(data[6:12]), _mac_text(data[0:6]),
                    ethertype, src, dst, proto, sport, dport,
                )
            )  # fmt: skip

    def first(self, match: Callable[[Frame], bool], after: float = 0.0) -> Frame | None:
        return next((f for f in list(self.frames) if f.ts >= after and match(f)), None)

    def wait_first(
        self, match: Callable[[Frame], bool], after: float = 0.0, timeout: float = 10.0
    ) -> Frame:
        found = wait_for(
            lambda: self.first(match, after), timeout, interval=0.02, what=f"a frame on {self.dev}"
        )
        assert found is not None
        return found

    def count(self, match: Callable[[Frame], bool], after: float = 0.0) -> int:
        return sum(1 for f in list(self.frames) if f.ts >= after and match(f))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> FrameCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpDuplex:
    """One TCP connection carrying a rate-limited bulk stream one way and a heartbeat the other.

    The bulk side (``bulk="server"``: the server sends, ``"client"``: the client sends) writes
    a verified pattern at RATE bytes/s in CHUNK-byte writes; the other side writes a small
    verified heartbeat every BEAT seconds. The default (100 KiB/s in 1 KiB writes) keeps the
    bulk sender transmitting through an outage of ~100 ms before its congestion window is
    full, so the first segment after a repair is not delayed by a TCP timer. The heartbeat
    is what a live host does after it moved (its frames teach the bridge the new port); the
    bulk sender's segments (data or ACKs of the heartbeat) are what the cached flow carries
    back. ``stop()`` half-closes both ends, drains both to EOF and
    returns ``(bulk, beat)`` as ``StreamResult``s; ``intact`` on both = byte-exact, no reset.
    """

    def __init__(
        self,
        client_ns: str,
        server_ns: str,
        server_addr: str,
        *,
        bulk: Literal["server", "client"] = "server",
        rate: float = 100 * 1024,
        chunk: int = 1024,
        beat: float = 0.01,
        timeout: float = 60.0,
    ) -> None:
        self.client_ns, self.server_ns, self.server_addr = client_ns, server_ns, server_addr
        self.bulk_side, self.rate, self.beat, self.timeout = bulk, rate, beat, timeout
        self.chunk = chunk
        block = os.urandom(TcpStream.PATTERN)
        self._pattern = memoryview(block + block)
        self.sent = [0, 0]  # bulk, beat
        self.received = [0, 0]
        self._mismatch: list[int | None] = [None, None]
        self._errors: list[str] = []
        self._stop = threading.Event()
        self._eof = [threading.Event(), threading.Event()]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.client: tuple[str, int] = ("", 0)
        self.server: tuple[str, int] = ("", 0)
        self._t0 = 0.0

    def start(self) -> TcpDuplex:
        srv = tcp_listen(self.server_ns, self.server_addr)
        srv.settimeout(self.timeout)
        port = srv.getsockname()[1]
        cli = tcp_connect(self.client_ns, self.server_addr, port, timeout=self.timeout)
        conn, _ = srv.accept()
        srv.close()
        conn.settimeout(self.timeout)
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sockets = [cli, conn]
        self.client, self.server = cli.getsockname()[:2], (self.server_addr, port)
        bulk, beat = (conn, cli) if self.bulk_side == "server" else (cli, conn)
        self._t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._send, args=(bulk, 0, self.rate, self.chunk)),
            threading.Thread(target=self._send, args=(beat, 1, 64 / self.beat, 64)),
            threading.Thread(target=self._recv, args=(beat, 0)),
            threading.Thread(target=self._recv, args=(bulk, 1)),
        ]
        for t in self._threads:
            t.daemon = True
            t.start()
        return self

    def _send(self, sock: socket.socket, which: int, rate: float, chunk: int) -> None:
        try:
            while not self._stop.is_set():
                off = self.sent[which] % TcpStream.PATTERN
                self.sent[which] += sock.send(self._pattern[off : off + chunk])
                ahead = self.sent[which] / rate - (time.monotonic() - self._t0)
                if ahead > 0:
                    self._stop.wait(ahead)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._errors.append(f"send {'bulk' if which == 0 else 'beat'}: {exc!r}")

    def _recv(self, sock: socket.socket, which: int) -> None:
        try:
            while True:
                data = sock.recv(256 * 1024)
                if not data:
                    break
                if self._mismatch[which] is None:
                    base = self.received[which]
                    for i in range(0, len(data), TcpStream.PATTERN):
                        part = data[i : i + TcpStream.PATTERN]
                        off = (base + i) % TcpStream.PATTERN
                        if part != self._pattern[off : off + len(part)]:
                            self._mismatch[which] = base + i
                            break
                self.received[which] += len(data)
        except OSError as exc:
            self._errors.append(f"recv {'bulk' if which == 0 else 'beat'}: {exc!r}")
        finally:
            self._eof[which].set()

    @property
    def bulk_received(self) -> int:
        return self.received[0]

    @property
    def alive(self) -> bool:
        return not self._errors and not any(e.is_set() for e in self._eof)

    def wait_bulk(self, nbytes: int, timeout: float | None = None) -> None:
        """Block until NBYTES of bulk data arrived in total (raises on error/timeout)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self.received[0] < nbytes:
            if not self.alive:
                raise RuntimeError(f"duplex ended early: {self._errors or 'EOF'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"duplex: {self.received[0]} of {nbytes} bulk bytes arrived")
            time.sleep(0.02)

    def stop(self, timeout: float | None = None) -> tuple[StreamResult, StreamResult]:
        wait = self.timeout if timeout is None else timeout
        self._stop.set()
        for t in self._threads[:2]:
            t.join(timeout=wait)
        for e in self._eof:
            e.wait(wait)
        for s in self._sockets:
            s.close()
        for t in self._threads:
            t.join(timeout=5)
        seconds = time.monotonic() - self._t0
        error = "; ".join(self._errors) or None
        return tuple(  # type: ignore[return-value]
            StreamResult(
                sent=self.sent[i], received=self.received[i], seconds=seconds,
                client=self.client, server=self.server, mismatch_at=self._mismatch[i],
                error=error or (None if self._eof[i].is_set() else "no EOF"),
            )
            for i in (0, 1)
        )  # fmt: skip


class UdpDuplex:
    """UDP between the client (CLIENT_NS, which speaks first: it is conntrack's original
    direction) and a server: the client sends a 16-byte heartbeat every BEAT seconds, the
    server answers with sequence-numbered datagrams every INTERVAL seconds to whatever
    address the heartbeat came from (the masqueraded one). ``arrivals`` holds
    (time.time(), seq) of the server's datagrams at the client.

    OPENING orders the first packets, which decides how the kernel offloads the flow (UDP
    needs no reply): ``"reply-first"``: the client waits for the first datagram before its
    second heartbeat, so the first reply offloads the flow and conntrack announces it (an
    event for the reply); ``"beats-first"``: the server answers from the third heartbeat
    on, so the client's second heartbeat offloads the flow with no event at all and the
    entry stays ``[UNREPLIED] [OFFLOAD]`` (its replies never reach conntrack); ``"race"``:
    either, as threads get scheduled."""

    def __init__(
        self,
        client_ns: str,
        server_ns: str,
        server_addr: str,
        *,
        interval: float = 0.002,
        beat: float = 0.01,
        opening: Literal["race", "reply-first", "beats-first"] = "race",
    ) -> None:
        self.interval, self.beat, self.opening = interval, beat, opening
        self._srv = in_netns(server_ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self._srv.bind((server_addr, 0))
        self._srv.settimeout(0.2)
        self._cli = in_netns(client_ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self._cli.connect(self._srv.getsockname())
        self._cli.settimeout(0.2)
        self.client = self._cli.getsockname()[:2]
        self.server = self._srv.getsockname()[:2]
        self.sent = 0
        self.send_blocked = 0  # the server's sends that timed out (full send buffer)
        self.arrivals: list[tuple[float, int]] = []
        self.beats = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._beat, daemon=True),
            threading.Thread(target=self._serve_beats, daemon=True),
            threading.Thread(target=self._serve, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]
        self._peer_addr: Any = None

    def start(self) -> UdpDuplex:
        for t in self._threads:
            t.start()
        return self

    def _beat(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._cli.send(struct.pack("!QQ", 0xBEA7, n))
            n += 1
            if n == 1 and self.opening == "reply-first":
                deadline = time.monotonic() + 10
                while not self.arrivals and time.monotonic() < deadline:
                    if self._stop.wait(0.001):
                        return
            self._stop.wait(self.beat)

    def _serve_beats(self) -> None:
        while not self._stop.is_set():
            try:
                _, addr = self._srv.recvfrom(64)
            except (TimeoutError, OSError):
                continue
            self.beats += 1
            self._peer_addr = addr

    def _serve(self) -> None:
        first = 3 if self.opening == "beats-first" else 1
        while (self._peer_addr is None or self.beats < first) and not self._stop.is_set():
            self._stop.wait(0.001)
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                self._srv.sendto(struct.pack("!QQ", 0xDA7A, self.sent), self._peer_addr)
            except (TimeoutError, BlockingIOError):
                # The send buffer is full: the datagrams are held somewhere on the
                # path (a neighbour's unresolved queue keeps the sender's skbs).
                # Counted, not fatal: the sender keeps going, as a real one would.
                self.send_blocked += 1
            self.sent += 1
            ahead = self.sent * self.interval - (time.monotonic() - t0)
            if ahead > 0:
                self._stop.wait(ahead)

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._cli.recv(64)
            except (TimeoutError, OSError):
                continue
            magic, seq = struct.unpack("!QQ", data[:16])
            if magic == 0xDA7A:
                self.arrivals.append((time.time(), seq))

    def received_after(self, t: float) -> int:
        return sum(1 for ts, _ in list(self.arrivals) if ts >= t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._cli.close()
        self._srv.close()


class WatchProcess:
    """``offloadctl watch --netns NS --json`` as a subprocess; its lines, each stamped with the
    ``time.time()`` at which this process read it (a late bound: the line was written before)."""

    def __init__(self, netns: str = NSR, *extra: str) -> None:
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "watch", "--netns", netns, "--json",
             *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append((time.time(), json.loads(line)))
            except ValueError:
                self.lines.append((time.time(), {"unparsed": line.rstrip()}))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def wait_ready(self, timeout: float = 180.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"watch exited {self.proc.returncode}: {self.stderr[-20:]}")
            return any(rec.get("event") == "ready" for _, rec in self.lines)

        wait_for(ready, timeout, interval=0.1, what="offloadctl watch to be ready")

    def since(self, t: float) -> list[tuple[float, dict[str, Any]]]:
        return [(ts, rec) for ts, rec in list(self.lines) if ts >= t]

    def teardowns(self, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        return [(ts, r) for ts, r in self.since(since) if r.get("decision") == "tore down"]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for t in self._threads:
            t.join(timeout=5)
        return self.proc.returncode


@contextmanager
def running_watch(netns: str = NSR) -> Iterator[WatchProcess]:
    """``offloadctl watch`` for the block, ready when it starts; it must stop cleanly
    (exit 0, its "stopped" line, no traceback)."""
    w = WatchProcess(netns)
    w.wait_ready()
    yield w
    code = w.stop()
    assert code == 0, w.stderr[-20:]
    assert any(r.get("event") == "stopped" for _, r in w.lines), w.lines[-5:]
    assert not any("Traceback" in line for line in w.stderr), w.stderr


# --------------------------------------------------------------------------- diagnostics
# (what a failing VM scenario prints, so that the failure explains itself)


def describe_frames(frames: list[Frame], since: float, limit: int = 12) -> str:
    """Frames at or after SINCE grouped by kind (direction, L3 endpoints, ports): count and
    first/last time relative to SINCE, in ms. Lines beyond LIMIT are summed up."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for f in frames:
        if f.ts < since:
            continue
        key = (
            "out" if f.outgoing else "in", f"{f.ethertype:04x}", f.src_mac, f.dst_mac,
            f.proto, f"{f.src}:{f.sport}", f"{f.dst}:{f.dport}",
        )  # fmt: skip
        groups.setdefault(key, []).append(f.ts)
    rows = sorted(groups.items(), key=lambda kv: kv[1][0])
    lines = [
        f"{k[0]:>3} {k[1]} {k[2]} > {k[3]} p{k[4]} {k[5]} > {k[6]}: {len(ts)} frames, "
        f"+{(ts[0] - since) * 1000:.1f} .. +{(ts[-1] - since) * 1000:.1f} ms"
        for k, ts in rows[:limit]
    ]
    if len(rows) > limit:
        lines.append(
            f"... {len(rows) - limit} more kinds, {sum(len(t) for _, t in rows[limit:])} frames"
        )
    return "\n".join(lines) or "(no frames)"


def link_counters(ns: str) -> dict[str, tuple[int, int]]:
    """(rx, tx) packets of every link in NS: two snapshots tell where traffic went, at no
    cost while it flows (a capture thread per device would load the VM's CPUs)."""
    data = json.loads(run("ip", "-n", ns, "-s", "-j", "link") or "[]")
    return {
        str(d["ifname"]): (int(d["stats64"]["rx"]["packets"]), int(d["stats64"]["tx"]["packets"]))
        for d in data
        if "stats64" in d
    }


def describe_counters(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    return "\n".join(
        f"{dev}: rx +{rx - before.get(dev, (0, 0))[0]}, tx +{tx - before.get(dev, (0, 0))[1]}"
        for dev, (rx, tx) in after.items()
    )


def kernel_state(
    ns: str, *, bridges: tuple[str, ...] = ("br0",), others: tuple[str, ...] = ()
) -> str:
    """The router's state a flowtable invalidation depends on, as text: every conntrack entry
    (``[OFFLOAD]``, NAT, ids), the bridges' FDB, neighbours, links with counters, the owned
    nft table (flowtable devices, counters, the NAT guard's drops); OTHERS: namespaces whose
    links and bridge ports are shown too (e.g. the switch)."""

    def cmd(title: str, *argv: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            out = (proc.stdout + proc.stderr).rstrip()
        except (OSError, subprocess.SubprocessError) as exc:
            out = repr(exc)
        return f"--- {title}\n{out}"

    parts = [
        cmd(f"conntrack -L ({ns})", "ip", "netns", "exec", ns, "conntrack", "-L", "-o", "id"),
        *(
            cmd(f"bridge fdb {br} ({ns})", *f"bridge -n {ns} fdb show br {br} dynamic".split())
            for br in bridges
        ),
        cmd(f"ip neigh ({ns})", "ip", "-n", ns, "neigh"),
        cmd(f"ip -s -o link ({ns})", "ip", "-n", ns, "-s", "-o", "link"),
        cmd(f"bridge link ({ns})", "bridge", "-n", ns, "link"),
        cmd(f"nft list ruleset ({ns})", "ip", "netns", "exec", ns, "nft", "list", "ruleset"),
        *(cmd(f"bridge link ({o})", "bridge", "-n", o, "link") for o in others),
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- two next hops
# (issue 20: the route to B moves from next hop N1 on br1 to N2 on br2 mid-stream)

NSN1 = "nsn1"  # next-hop router N1, on br1
NSN2 = "nsn2"  # next-hop router N2, on br2
NSB = NS2  # host B, behind both next hops


@dataclass(frozen=True)
class NextHopTopology:
    """A ── br0 [nsr1] br1 ── N1 ──┐
                     br2 ── N2 ──┴── B (10.0.9.99 / fd00:9::99 on lo)::

        ns1 eth0 ── pa [br0 10.0.1.1]
                       [br1 10.0.21.1] pn1 ── eth0 nsn1 (N1 .2) eth1 10.0.31.1 ── b1 ┐
                       [br2 10.0.22.1] pn2 ── eth0 nsn2 (N2 .2) eth1 10.0.32.1 ── b2 ┴ ns2 (B)

    Each of the router's bridges has one port (pa, pn1, pn2): paths through them are
    direct-transmit paths (the flowtable caches port and next-hop MAC). The router routes
    B's prefix via N1, B's default route (source B's service address) goes via N1 too;
    ``change()`` moves both to N2 and stops N1's forwarding. IPv6 mirrors IPv4 (``fd00:``
    with the same numbers). N2 has never talked to the router before a change: its
    neighbour entry in the router is unresolved when the route moves (``reset()`` flushes
    neighbours of br2 and in N2 before each case).
    """

    a: dict[int, str] = field(default_factory=lambda: {4: "10.0.1.2", 6: "fd00:1::2"})
    b: dict[int, str] = field(default_factory=lambda: {4: "10.0.9.99", 6: "fd00:9::99"})
    prefix: dict[int, str] = field(default_factory=lambda: {4: "10.0.9.0/24", 6: "fd00:9::/64"})
    namespaces: tuple[str, ...] = (NSA, NSR, NSN1, NSN2, NSB)

    @staticmethod
    def hop(n: int, v: int, host: int) -> str:
        """Address HOST on the router <-> Nn link (20+n) or the Nn <-> B link (30+n)."""
        return f"10.0.{n}.{host}" if v == 4 else f"fd00:{n}::{host}"

    def routes(self, n: int, v: int) -> tuple[list[str], list[str]]:
        """(router, B) ``ip`` commands that route B's prefix / B's default via Nn."""
        # (``ip`` takes the family from the gateway: ``ip -batch`` lines have no options.)
        return (
            [f"route replace {self.prefix[v]} via {self.hop(20 + n, v, 2)}"],
            [f"route replace default via {self.hop(30 + n, v, 1)} src {self.b[v]}"],
        )

    def reset(self) -> None:
        """Everything via N1, N1 forwarding, N2 unknown to the router and vice versa."""
        for v in (4, 6):
            router, b = self.routes(1, v)
            ip_batch(NSR, router)
            ip_batch(NSB, b)
        _forwarding(NSN1, True)
        ip_batch(NSR, ["neigh flush dev br2"])  # both families
        ip_batch(NSN2, ["neigh flush all"])

    def change(self, v: int) -> float:
        """The issue's change, in its order: the router's route to B's prefix moves to N2,
        B's default route moves to N2, N1 stops forwarding. Returns ``time.time()`` just
        before the first command."""
        router, b = self.routes(2, v)
        t = time.time()
        ip_batch(NSR, router)
        ip_batch(NSB, b)
        _forwarding(NSN1, False)
        return t

    def teardown(self) -> None:
        delete_namespaces(list(self.namespaces))


def _forwarding(ns: str, on: bool) -> None:
    sysctl(ns, net__ipv4__ip_forward=int(on), net__ipv6__conf__all__forwarding=int(on))


def build_nexthop() -> NextHopTopology:
    """Create ``NextHopTopology`` (v4 and v6), routed via N1; B reaches A both ways."""
    topo = NextHopTopology()
    delete_namespaces(list(topo.namespaces))
    for ns in topo.namespaces:
        run("ip", "netns", "add", ns)
        ip_batch(ns, ["link set lo up"])
        # Neither reverse-path filter nor redirects: B's packets legitimately arrive
        # through either next hop during a change.
        sysctl(ns, net__ipv4__conf__all__rp_filter=0, net__ipv4__conf__default__rp_filter=0,
               net__ipv4__conf__all__send_redirects=0)  # fmt: skip
    for ns in (NSR, NSN1, NSN2):
        _forwarding(ns, True)
    pairs = [("eth0", NSA, "pa", NSR), ("eth0", NSN1, "pn1", NSR), ("eth0", NSN2, "pn2", NSR),
             ("eth1", NSN1, "b1", NSB), ("eth1", NSN2, "b2", NSB)]  # fmt: skip
    for a, ns_a, b, ns_b in pairs:
        run("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)

    def l3(dev: str, n: int, host: int) -> list[str]:
        return [
            f"addr add {topo.hop(n, 4, host)}/24 dev {dev}",
            f"addr add {topo.hop(n, 6, host)}/64 dev {dev} nodad",
            f"link set {dev} up",
        ]

    router = []
    for i, (br, port, net) in enumerate((("br0", "pa", 1), ("br1", "pn1", 21), ("br2", "pn2", 22))):
        mac = f"02:00:00:00:02:{i:02x}"  # a MAC of its own, as routers' bridges have
        router += [
            f"link add {br} address {mac} type bridge stp_state 0 forward_delay 0",
            f"link set {port} master {br} up",
            *l3(br, net, 1),
        ]
    ip_batch(NSR, router)
    ip_batch(NSA, [*l3("eth0", 1, 2), "route add default via 10.0.1.1",
                   "route add default via fd00:1::1"])  # fmt: skip
    for n, ns in ((1, NSN1), (2, NSN2)):
        ip_batch(ns, [*l3("eth0", 20 + n, 2), *l3("eth1", 30 + n, 1),
                      f"route add default via 10.0.{20 + n}.1",
                      f"route add default via fd00:{20 + n}::1",
                      f"route add {topo.prefix[4]} via 10.0.{30 + n}.2",
                      f"route add {topo.prefix[6]} via fd00:{30 + n}::2"])  # fmt: skip
    service = [f"addr add {topo.b[4]}/32 dev lo", f"addr add {topo.b[6]}/128 dev lo"]
    ip_batch(NSB, [*l3("b1", 31, 2), *l3("b2", 32, 2), *service])
    topo.reset()
    for v in (4, 6):
        wait_for(partial(ping, NSB, topo.a[v], 0.5), timeout=15, what=f"B reaches {topo.a[v]}")
    return topo


class ResetSniffer:
    """Every TCP RST (IPv4 or IPv6, untagged) seen on any device of NS, as text lines."""

    def __init__(self, ns: str) -> None:
        self._sock = in_netns(
            ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        )
        self._sock.settimeout(0.1)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rst-{ns}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pkt, addr = self._sock.recvfrom(128)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            kind = pkt[12:14]
            if kind == b"\x08\x00" and len(pkt) >= 54 and pkt[23] == socket.IPPROTO_TCP:
                fam, src, dst = socket.AF_INET, pkt[26:30], pkt[30:34]
                tcp = 14 + (pkt[14] & 0x0F) * 4
            elif kind == b"\x86\xdd" and len(pkt) >= 74 and pkt[20] == socket.IPPROTO_TCP:
                tcp, fam, src, dst = 54, socket.AF_INET6, pkt[22:38], pkt[38:54]
            else:
                continue
            if len(pkt) > tcp + 13 and pkt[tcp + 13] & 0x04:
                sport, dport = struct.unpack_from("!HH", pkt, tcp)
                way = "out" if addr[2] == PACKET_OUTGOING else "in"
                self.seen.append(
                    f"{time.time():.3f} {addr[0]} {way} {socket.inet_ntop(fam, src)}:{sport} > "
                    f"{socket.inet_ntop(fam, dst)}:{dport} RST"
                )

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        return self.seen

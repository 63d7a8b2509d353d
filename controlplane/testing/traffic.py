"""Traffic between namespaces, in-process: TCP and UDP with a byte-exact check, and a wire
capture that tells which addresses and ports crossed a device (NAT seen on the wire).

A socket keeps the namespace it was created in, so each one is created inside
``controlplane.kernel.netns.entered`` and then used from any thread: no process start-up
per transfer (seconds under the VM's TCG emulation).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Literal

from controlplane.kernel.netns import entered


class TrafficError(AssertionError):
    """Traffic did not arrive intact: the test fails with what was sent and received."""


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _socket(netns: str, family: socket.AddressFamily, kind: int) -> socket.socket:
    with entered(netns):
        return socket.socket(family, kind)


Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Exchange:
    """What one ``exchange`` moved: bytes each way, both checked by sha256."""

    upload: int  # client -> server
    download: int  # server -> client


class _Conn:
    """Shared shape of TCP and UDP connections: the four addresses a NAT test asks about.

    ``client``: the client socket's own address (the conntrack original source);
    ``target``: what the client sent to (the original destination; port 0 = the
    listener's); ``server``: the server socket's address (differs from ``target`` after
    DNAT); ``server_saw``: the client address as the server saw it (differs from
    ``client`` after SNAT/masquerade).
    """

    proto: Literal["tcp", "udp"]
    kind: socket.SocketKind

    def __init__(
        self, client_ns: str, server_ns: str, target: Endpoint, listen: Endpoint, timeout: float
    ) -> None:
        self.client_ns, self.server_ns, self.timeout = client_ns, server_ns, timeout
        self.target, self.listen = target, listen
        self.client: Endpoint = ("", 0)
        self.server: Endpoint = ("", 0)
        self.server_saw: Endpoint = ("", 0)
        self._sockets: list[socket.socket] = []
        self._srv = self._open(server_ns, listen[0])
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(listen)
        if target[1] == 0:
            self.target = (target[0], self._srv.getsockname()[1])
        self._cli = self._open(client_ns, target[0])
        self._connect()

    def _connect(self) -> None:
        raise NotImplementedError

    def _open(self, netns: str, addr: str) -> socket.socket:
        sock = _socket(netns, _family(addr), self.kind)
        self._sockets.append(sock)
        sock.settimeout(self.timeout)
        return sock

    def close(self) -> None:
        for s in self._sockets:
            s.close()
        self._sockets.clear()

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c, t, s = self.client, self.target, self.server
        return f"{self.proto} {c[0]}:{c[1]} -> {t[0]}:{t[1]} (server {s[0]}:{s[1]})"


class TcpConn(_Conn):
    """One TCP connection from CLIENT_NS to TARGET, accepted by a listener in SERVER_NS on
    LISTEN; open until ``close()`` so a test can look at the kernel while it lives."""

    proto: Literal["tcp", "udp"] = "tcp"
    kind = socket.SOCK_STREAM

    def _connect(self) -> None:
        self._srv.listen(1)
        try:
            self._cli.connect(self.target)
            conn, peer = self._srv.accept()
        except OSError as exc:
            self.close()
            t = self.target
            raise TrafficError(f"tcp from {self.client_ns} to {t[0]}:{t[1]}: {exc!r}") from None
        conn.settimeout(self.timeout)
        self._sockets.append(conn)
        self._conn = conn
        self.client = self._cli.getsockname()[:2]
        self.server = conn.getsockname()[:2]
        self.server_saw = peer[:2]

    def exchange(self, nbytes: int = 1 << 20) -> Exchange:
        """NBYTES of random data each way at once; raises TrafficError unless every byte
        arrived as sent."""
        up, down = os.urandom(nbytes), os.urandom(nbytes)
        got: dict[str, bytes] = {}
        errors: list[str] = []

        def send(sock: socket.socket, data: bytes, what: str) -> None:
            try:
                sock.sendall(data)
            except OSError as exc:
                errors.append(f"{what} send: {exc!r}")

        def recv(sock: socket.socket, what: str) -> None:
            parts: list[bytes] = []
            left = nbytes
            try:
                while left > 0:
                    chunk = sock.recv(min(left, 1 << 20))
                    if not chunk:
                        errors.append(f"{what}: connection closed, {nbytes - left}/{nbytes} B")
                        break
                    parts.append(chunk)
                    left -= len(chunk)
            except OSError as exc:
                errors.append(f"{what} receive: {exc!r} after {nbytes - left}/{nbytes} B")
            got[what] = b"".join(parts)

        threads = [
            threading.Thread(target=send, args=(self._cli, up, "upload")),
            threading.Thread(target=send, args=(self._conn, down, "download")),
            threading.Thread(target=recv, args=(self._conn, "upload")),
            threading.Thread(target=recv, args=(self._cli, "download")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 2)
        for what, data in (("upload", up), ("download", down)):
            if got.get(what) != data:
                have = got.get(what, b"")
                errors.append(
                    f"{what}: {len(have)} of {nbytes} B, sha256 "
                    f"{hashlib.sha256(have).hexdigest()[:12]} != sent "
                    f"{hashlib.sha256(data).hexdigest()[:12]}"
                )
        if errors:
            raise TrafficError(f"{self!r}: " + "; ".join(errors))
        return Exchange(nbytes, nbytes)


class UdpConn(_Conn):
    """UDP from CLIENT_NS (which speaks first: conntrack's original direction) to TARGET,
    answered by a socket in SERVER_NS bound to LISTEN."""

    proto: Literal["tcp", "udp"] = "udp"
    kind = socket.SOCK_DGRAM

    def _connect(self) -> None:
        self._cli.connect(self.target)
        self.client = self._cli.getsockname()[:2]
        self.server = self._srv.getsockname()[:2]

    def exchange(self, count: int = 100, size: int = 1200) -> Exchange:
        """COUNT request/answer rounds of SIZE random bytes each way, in lock step (a lost
        datagram is a failure, not a retry); raises TrafficError on any difference."""
        for seq in range(count):
            up = struct.pack("!I", seq) + os.urandom(size - 4)
            down = struct.pack("!I", seq) + os.urandom(size - 4)
            try:
                self._cli.send(up)
                data, peer = self._srv.recvfrom(size + 1)
                if data != up:
                    raise TrafficError(f"{self!r}: datagram {seq} arrived changed at the server")
                self.server_saw = peer[:2]
                self._srv.sendto(down, peer)
                if self._cli.recv(size + 1) != down:
                    raise TrafficError(f"{self!r}: answer {seq} arrived changed at the client")
            except TimeoutError:
                raise TrafficError(f"{self!r}: datagram {seq} of {count} lost") from None
            except OSError as exc:  # e.g. an ICMP error came back
                raise TrafficError(f"{self!r}: datagram {seq} of {count}: {exc!r}") from None
        return Exchange(count * size, count * size)


# --------------------------------------------------------------------------- capture

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
_VLAN_TPIDS = (0x8100, 0x88A8)


@dataclass(frozen=True)
class Packet:
    """The addresses of one TCP/UDP packet seen on a device (VLAN tags skipped)."""

    proto: str
    src: str
    sport: int
    dst: str
    dport: int


def parse_frame(frame: bytes) -> Packet | None:
    """The IPv4/IPv6 TCP/UDP addresses of an Ethernet frame, or None."""
    off = 12
    ethertype = struct.unpack_from("!H", frame, off)[0] if len(frame) >= 14 else 0
    while ethertype in _VLAN_TPIDS and len(frame) >= off + 6:
        off += 4
        ethertype = struct.unpack_from("!H", frame, off)[0]
    ip = off + 2
    if ethertype == 0x0800 and len(frame) >= ip + 20:
        hlen, proto = (frame[ip] & 0x0F) * 4, frame[ip + 9]
        src, dst = (
            socket.inet_ntoa(frame[ip + 12 : ip + 16]),
            socket.inet_ntoa(frame[ip + 16 : ip + 20]),
        )
        l4 = ip + hlen
    elif ethertype == 0x86DD and len(frame) >= ip + 40:
        proto = frame[ip + 6]
        src = socket.inet_ntop(socket.AF_INET6, frame[ip + 8 : ip + 24])
        dst = socket.inet_ntop(socket.AF_INET6, frame[ip + 24 : ip + 40])
        l4 = ip + 40
    else:
        return None
    if proto not in (6, 17) or len(frame) < l4 + 4:
        return None
    sport, dport = struct.unpack_from("!HH", frame, l4)
    return Packet("tcp" if proto == 6 else "udp", src, sport, dst, dport)


class Capture:
    """Every distinct TCP/UDP address tuple seen on DEV in NETNS while open (both ways);
    complete once closed (``close`` drains what the kernel queued)::

        with lab.capture("wan", "eth0") as wire:
            conn.exchange()
        assert wire.seen(src=ROUTER_WAN) and not wire.seen(src=LAN_HOST)
    """

    def __init__(self, netns: str, dev: str) -> None:
        self.netns, self.dev = netns, dev
        self.packets: dict[Packet, int] = {}
        self.dropped = 0  # frames the kernel could not queue for us (known at close)
        self._stop = threading.Event()
        with entered(netns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        # A GSO frame's whole size counts against the buffer: the default holds a handful.
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        self._sock.bind((dev, ETH_P_ALL))
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"capture-{dev}")
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                frame, addr = self._sock.recvfrom(256)
            except TimeoutError:
                if self._stop.is_set():  # only once the queue is drained
                    return
                continue
            except OSError:
                return
            # A packet socket hears every device between socket() and bind().
            packet = parse_frame(frame) if addr[0] == self.dev else None
            if packet is not None:
                self.packets[packet] = self.packets.get(packet, 0) + 1

    def seen(
        self,
        *,
        src: str | None = None,
        dst: str | None = None,
        sport: int | None = None,
        dport: int | None = None,
        proto: str | None = None,
    ) -> int:
        """How many packets matched every given field; AssertionError if the kernel
        dropped frames of this capture (a count would then be a guess)."""
        if self.dropped:
            raise AssertionError(
                f"capture on {self.dev} in {self.netns}: the kernel dropped {self.dropped} "
                "frames, so what it saw is incomplete"
            )
        want = {"src": src, "dst": dst, "sport": sport, "dport": dport, "proto": proto}
        return sum(
            n
            for p, n in list(self.packets.items())
            if all(v is None or getattr(p, k) == v for k, v in want.items())
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._sock.fileno() >= 0:
            stats = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            self.dropped += struct.unpack("II", stats)[1]  # tp_packets, tp_drops
        self._sock.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

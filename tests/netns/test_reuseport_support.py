"""Helpers shared by the reuseport netns tests (no tests in here).

Processes share pins through a bpffs mounted in *this* (the host's) mount
namespace: the tests enter network namespaces with setns only, never with
'ip netns exec', whose private mount namespace would hide the mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from controlplane.kernel.netns import entered

PORT = 8080
TCP_FASTOPEN_CONNECT = 30  # not in Python's socket module
TCP_INFO_UNACKED = 24  # offset of tcpi_unacked: a listener's accept queue length


@contextlib.contextmanager
def private_bpffs() -> Iterator[str]:
    """A fresh bpffs mount for one test session, unmounted afterwards."""
    path = tempfile.mkdtemp(prefix="offloadctl-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"], check=True)


def addr(family: int) -> str:
    return "127.0.0.1" if family == socket.AF_INET else "::1"


def listener(family: int, *, fastopen: bool = False, reuseport: bool = True) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((addr(family), PORT))
    if fastopen:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 256)
    s.listen(256)
    return s


def accept_queue(s: socket.socket) -> int:
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, TCP_INFO_UNACKED)[0])


def wait_for(what: str, cond: object, timeout: float = 3.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def syn_recv_count(netns: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Htn", "state", "syn-recv", f"sport = :{PORT}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


def drop_final_ack(netns: str, tmpdir: str) -> None:
    """Drop every client packet to the port except SYNs: handshakes never complete."""
    rules = os.path.join(tmpdir, "drop-ack.nft")
    with open(rules, "w") as f:
        f.write(
            "table inet rptest {\n"
            "  chain input {\n"
            "    type filter hook input priority 0;\n"
            f"    tcp dport {PORT} tcp flags & (syn | ack) == ack counter drop\n"
            "  }\n"
            "}\n"
        )
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", rules], check=True)


def pass_ack(netns: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", "rptest"], check=True
    )


def open_clients(netns: str, family: int, n: int, *, fastopen: bool) -> list[socket.socket]:
    clients = []
    with entered(netns):
        for i in range(n):
            c = socket.socket(family, socket.SOCK_STREAM)
            c.settimeout(5)
            if fastopen:
                c.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            c.connect((addr(family), PORT))
            # With TCP_FASTOPEN_CONNECT this send is what carries the SYN.
            c.sendall(payload(i))
            clients.append(c)
    return clients


def payload(i: int) -> bytes:
    return f"client-{i:04d}\n".encode()


def serve(server: socket.socket, n: int, timeout: float) -> list[bytes]:
    """Accept up to ``n`` connections, echo each payload back with a mark."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    server.settimeout(0.1)
    while len(got) < n and time.monotonic() < deadline:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(64)
                if not chunk:
                    break
                data += chunk
            got.append(data)
            conn.sendall(b"new:" + data)
    return got


@dataclass
class Outcome:
    served: list[bytes] = field(default_factory=list)
    reset: int = 0
    other: list[str] = field(default_factory=list)


def collect(clients: list[socket.socket], timeout: float) -> Outcome:
    """Read every client's reply (or its error) at once, with one deadline."""
    out = Outcome()
    sel = selectors.DefaultSelector()
    bufs: dict[socket.socket, bytes] = {}
    for c in clients:
        c.setblocking(False)
        sel.register(c, selectors.EVENT_READ)
        bufs[c] = b""
    deadline = time.monotonic() + timeout
    while bufs and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            c = sock
            try:
                chunk = c.recv(128)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
                    out.reset += 1
                else:
                    out.other.append(str(exc))
                sel.unregister(c)
                del bufs[c]
                continue
            bufs[c] += chunk
            if not chunk or bufs[c].endswith(b"\n"):
                if bufs[c]:
                    out.served.append(bufs[c])
                else:
                    out.other.append("closed without reply")
                sel.unregister(c)
                del bufs[c]
    out.other += ["timeout"] * len(bufs)
    for c in clients:
        c.close()
    return out

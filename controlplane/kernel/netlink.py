"""Netlink framing, attribute codec and the batched request/ACK loop, written once.

Shared by the conntrack adapter (NETLINK_NETFILTER), the route lookups and the
watcher (NETLINK_ROUTE). Why by hand rather than pyroute2 (docs/netlink.md,
bench/bench_codec.py): header-and-attribute walking over ``struct`` is what
keeps a 20,000-event FDB burst and a 100,000-entry conntrack dump within the
invalidation budget, and ``IPRoute`` re-raises ENOBUFS forever after one
overflow.

Everything here is framing: no knowledge of what the attributes mean. Codecs
(``ctnetlink/conntrack.py``, ``rtnl/codec.py``) build
message bodies with :func:`nla`/:func:`nest` and read them with :func:`attrs`.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import mmap
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from controlplane.errors import KernelError
from controlplane.kernel.handles import Closing, Opening
from controlplane.kernel.netns import entered

__all__ = [
    "MALFORMED",
    "NLMSGHDR",
    "NetlinkSocket",
    "RecvBuffer",
    "Reply",
    "Subscription",
    "attrs",
    "error_code",
    "malformed",
    "message",
    "messages",
    "nest",
    "nla",
]

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_BROADCAST_ERROR = 4
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_REPLACE = 0x100
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_I32 = struct.Struct("=i")
HDR = NLMSGHDR.size

# One send carries this many requests; each yields one answer (an ACK is 36
# bytes with NETLINK_CAP_ACK but ~1 KiB of skb truesize against the buffer).
BATCH = 256
# Room for the largest datagram (a link notification with many SR-IOV VFs can
# pass 64 KiB); sockets receive into a buffer of this size allocated once.
RECV_SIZE = 1 << 20

T = TypeVar("T")


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length & 3)


def nest(kind: int, *children: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(children))


def message(msg_type: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    """nlmsghdr + body (the body is the family header and its attributes)."""
    return NLMSGHDR.pack(HDR + len(body), msg_type, flags, seq, pid) + body


def attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in buf[start:end]."""
    unpack = _NLA.unpack_from
    while start + 4 <= end:
        length, kind = unpack(buf, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, min(start + length, end)
        start += (length + 3) & ~3


def messages(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, start, end) of each message in one datagram; start is the header.

    A length shorter than a header is a framing error the kernel never
    produces: raise rather than loop.
    """
    offset = 0
    size = len(buf)
    unpack = NLMSGHDR.unpack_from
    while offset + HDR <= size:
        length, kind, flags, seq, _pid = unpack(buf, offset)
        if length < HDR:
            raise KernelError("netlink receive", "malformed netlink message")
        end = min(offset + length, size)
        yield kind, flags, seq, offset, end
        offset = (offset + length + 3) & ~3


# What a decoder raises on bytes the kernel would never send (a header or an
# attribute shorter than its type, an address of the wrong size, a name that is
# not UTF-8): turned into the one documented error, KernelError "malformed".
MALFORMED = (struct.error, IndexError, ValueError)  # ValueError: UnicodeDecodeError too


def malformed(what: str, exc: Exception) -> KernelError:
    return KernelError("netlink receive", f"malformed {what} ({type(exc).__name__}: {exc})")


def error_code(buf: bytes, start: int) -> int:
    """errno of an NLMSG_ERROR message at ``start`` (0 = ACK)."""
    code: int = _I32.unpack_from(buf, start + HDR)[0]
    return -code


@dataclass(frozen=True, slots=True)
class Reply(Generic[T]):
    """The answer to one request of a batch: an errno (0 = ok) and, when the
    kernel answered with a message rather than an ACK, that message's bytes."""

    item: T
    code: int
    data: bytes = b""


class RecvBuffer:
    """Receives datagrams into one buffer allocated once, returning a copy of each.

    ``sock.recv(RECV_SIZE)`` makes CPython allocate RECV_SIZE bytes per call and
    shrink them: ~17 us a datagram against ~1 us for ``recv_into`` here (about
    half the cost of an FDB event in the watcher). An anonymous mapping costs
    memory only for the pages datagrams have reached, not RECV_SIZE per socket.
    Not thread-safe: one per socket, used by its one reader.
    """

    def __init__(self, size: int = RECV_SIZE) -> None:
        self._view = memoryview(mmap.mmap(-1, size))

    def recv(self, sock: socket.socket, flags: int = 0) -> bytes:
        n = sock.recv_into(self._view, 0, flags)
        return self._view[:n].tobytes()


class NetlinkSocket(Closing):
    """A netlink socket opened in namespace ``netns`` (the current one for None).

    ``groups``: multicast bitmask (groups 1..32) to subscribe at bind;
    :meth:`join` adds groups by number (any number, e.g. RTNLGRP_* > 32).
    """

    def __init__(
        self,
        protocol: int,
        netns: str | None = None,
        *,
        groups: int = 0,
        rcvbuf: int = 4 << 20,
        operation: str = "netlink open",
        nonblocking: bool = False,
    ) -> None:
        self.operation = operation
        with entered(netns):
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
            except OSError as exc:
                raise KernelError(operation, exc.strerror or str(exc), exc.errno) from exc
        self.sock = sock
        self._rx = RecvBuffer()
        self._seq = 0
        try:
            sock.bind((0, groups))
            # Error ACKs without a copy of our request: keeps batches of ACKs small.
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.set_rcvbuf(rcvbuf)
            if nonblocking:
                sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise KernelError(operation, exc.strerror or str(exc), exc.errno) from exc

    # -- plumbing ---------------------------------------------------------
    def set_rcvbuf(self, size: int) -> None:
        """SO_RCVBUFFORCE (not capped by rmem_max; needs CAP_NET_ADMIN), else SO_RCVBUF."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def setopt(self, option: int, value: int = 1) -> None:
        self.sock.setsockopt(SOL_NETLINK, option, value)

    def join(self, group: int) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()  # idempotent (socket.close is)

    def next_seq(self) -> int:
        self._seq = (self._seq % 0xFFFFFFFF) + 1  # never 0: events carry seq 0
        return self._seq

    def _fail(self, operation: str, exc: OSError) -> KernelError:
        return KernelError(operation, exc.strerror or str(exc), exc.errno)

    def send(self, data: bytes, operation: str | None = None) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise self._fail(operation or self.operation, exc) from exc

    def recv_raw(self) -> bytes:
        """One datagram; errors (BlockingIOError, ENOBUFS) are the caller's to handle."""
        return self._rx.recv(self.sock)

    def queued(self, limit: int) -> Iterator[bytes | None]:
        """What a non-blocking socket holds, at most ``limit`` datagrams, never
        waiting. ``None`` stands where the kernel dropped datagrams (ENOBUFS:
        the caller resyncs); any other error raises KernelError."""
        recv, sock = self._rx.recv, self.sock
        for _ in range(limit):
            try:
                buf = recv(sock)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != _errno.ENOBUFS:
                    raise self._fail(self.operation, exc) from exc
                yield None
                continue
            yield buf

    def recv(self, operation: str | None = None) -> bytes:
        try:
            return self._rx.recv(self.sock)
        except OSError as exc:
            # ENOBUFS on a request socket means answers were dropped: counts
            # would be wrong, so fail (event sockets handle it themselves).
            raise self._fail(operation or self.operation, exc) from exc

    # -- request patterns ---------------------------------------------------
    def dump(
        self,
        operation: str,
        encode: Callable[[int], bytes],
        on_message: Callable[[int, bytes, int, int], None],
    ) -> None:
        """Send one NLM_F_DUMP request (``encode(seq)``) and hand every answer
        message of that seq to ``on_message(type, buf, start, end)`` until DONE."""
        seq = self.next_seq()
        self.send(encode(seq), operation)
        while True:
            buf = self.recv(operation)
            for kind, _flags, msg_seq, start, end in messages(buf):
                if msg_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = error_code(buf, start)
                    if code:
                        raise KernelError(operation, os.strerror(code), code)
                    continue
                on_message(kind, buf, start, end)

    def transact(
        self,
        operation: str,
        items: Iterable[T],
        encode: Callable[[T, int], bytes],
        batch: int = BATCH,
    ) -> Iterator[Reply[T]]:
        """Many requests per send, one answer each: the kernel handles the
        messages of a datagram in turn and answers each with its seq (an ACK or
        error for NLM_F_ACK requests, the object for a plain GET).

        Yields one :class:`Reply` per item, in the order the answers arrive.
        Errors are data here: the caller decides which errno is benign.
        """
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == batch:
                yield from self._exchange(operation, chunk, encode)
                chunk = []
        if chunk:
            yield from self._exchange(operation, chunk, encode)

    def _exchange(
        self, operation: str, chunk: list[T], encode: Callable[[T, int], bytes]
    ) -> Iterator[Reply[T]]:
        pending: dict[int, T] = {}
        parts: list[bytes] = []
        for item in chunk:
            seq = self.next_seq()
            pending[seq] = item
            parts.append(encode(item, seq))
        self.send(b"".join(parts), operation)
        while pending:
            buf = self.recv(operation)
            for kind, _flags, seq, start, end in messages(buf):
                if seq not in pending:
                    continue  # a late ACK of an already answered request
                item = pending.pop(seq)
                if kind == NLMSG_ERROR:
                    yield Reply(item, error_code(buf, start))
                else:
                    yield Reply(item, 0, buf[start:end])


class Subscription(Opening):
    """A multicast subscription (conntrack or rtnetlink events) of one namespace,
    opened by :meth:`open` and closed idempotently.

    Subclasses set ``operation`` (the name errors carry) and open with
    :meth:`_subscribe`; readers take the socket from :meth:`opened`, which
    fails with EBADF while the subscription is closed.
    """

    operation = "netlink watch"
    _sock: NetlinkSocket | None = None

    def _subscribe(
        self, protocol: int, netns: str | None, groups: int, rcvbuf: int
    ) -> NetlinkSocket:
        """Open the non-blocking event socket (closing one left open)."""
        self.close()
        self._sock = NetlinkSocket(
            protocol,
            netns,
            groups=groups,
            rcvbuf=rcvbuf,
            operation=self.operation,
            nonblocking=True,
        )
        return self._sock

    def opened(self) -> NetlinkSocket:
        if self._sock is None:
            raise KernelError(self.operation, "not open", _errno.EBADF)
        return self._sock

    def fileno(self) -> int:
        return self.opened().fileno()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # the descriptor may already be gone (that may be why we close)
            with contextlib.suppress(OSError):
                sock.close()


def drain(sock: socket.socket) -> int:
    """Read a non-blocking socket until EAGAIN; returns datagrams discarded.

    After ENOBUFS the queue holds a mix of events from before and after the
    overflow: the resync that follows re-reads the state, so they are stale.
    """
    dropped = 0
    while True:
        try:
            # MSG_TRUNC: the datagram is discarded whole without copying it out.
            sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except BlockingIOError:
            return dropped
        except OSError as exc:
            if exc.errno == _errno.ENOBUFS:
                continue
            raise
        dropped += 1

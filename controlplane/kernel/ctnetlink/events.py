"""Conntrack NEW/UPDATE/DESTROY notifications: what keeps the flow index current.

The invalidation engine answers "which flows use this MAC / next hop /
device" from an index, never from a dump per event (a 100,000-entry dump takes
~1 s). The index is fed by a start-up dump plus these notifications.

Delivery: ``NETLINK_BROADCAST_ERROR`` makes the kernel notice when a DESTROY
could not be delivered and retry it later (the entry stays on the dying list),
so the index never keeps a flow that is gone for good. ``NETLINK_NO_ENOBUFS``
keeps one overflow from latching an error on the socket; what it hides is
read back from the socket's drop counter (``SO_MEMINFO``), and any drop
triggers a re-dump: a lost NEW would otherwise leave a flow the engine can
never find.

Decoding reuses the dump's codec (``conntrack.decode_entry``) over the shared
framing in ``kernel/netlink.py`` (against pyroute2: docs/netlink.md,
bench/bench_codec.py).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.core.flowpath import Flow
from controlplane.kernel.ctnetlink.conntrack import (
    CT_DELETE,
    CT_NEW,
    NETLINK_NETFILTER,
    ConntrackSocket,
    decode_entry,
)
from controlplane.kernel.netlink import (
    NETLINK_BROADCAST_ERROR,
    NETLINK_NO_ENOBUFS,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NetlinkSocket,
    Subscription,
    drain,
    messages,
)

__all__ = ["CtChange", "CtEvents"]

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8
_MEMINFO = struct.Struct("=9I")
IPPROTO_TCP = 6
IPPROTO_UDP = 17


@dataclass(frozen=True, slots=True)
class CtChange:
    """One conntrack notification: ``flow`` appeared/changed (``gone`` False) or died."""

    flow: Flow
    gone: bool
    new: bool = False


class CtEvents(Subscription):
    """A subscription to one namespace's conntrack events; explicit open/poll/close.

    ``protocols``: only entries of these L4 protocols are reported (flowtables
    offload TCP and UDP only; the rest would only grow the index).
    """

    operation = "watch conntrack"

    def __init__(
        self,
        netns: str | None = None,
        *,
        rcvbuf: int = 32 << 20,
        protocols: frozenset[int] = frozenset({IPPROTO_TCP, IPPROTO_UDP}),
        updates: bool = False,
    ) -> None:
        self.netns = netns
        self.rcvbuf = rcvbuf
        self.protocols = protocols
        self.updates = updates
        self._drops = 0
        self.lost = 0  # times a drop forced a re-dump
        self.received = 0

    def open(self) -> None:
        groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        if self.updates:
            groups |= 1 << (NFNLGRP_CONNTRACK_UPDATE - 1)
        sock = self._subscribe(NETLINK_NETFILTER, self.netns, groups, self.rcvbuf)
        sock.setopt(NETLINK_BROADCAST_ERROR)
        sock.setopt(NETLINK_NO_ENOBUFS)
        self._drops = self._dropped(sock)

    def dump(self) -> list[Flow]:
        """The resync dump, same filter as the events."""
        flows: list[Flow] = []
        self.dump_each(flows.append)
        return flows

    def dump_each(self, on_flow: Callable[[Flow], None]) -> None:
        """The start-up dump, streamed (same filter as the events)."""
        protocols = self.protocols

        def keep(flow: Flow) -> None:
            if flow.orig.proto in protocols:
                on_flow(flow)

        with ConntrackSocket(self.netns) as ct:
            ct.dump_each(keep)

    @staticmethod
    def _dropped(nl: NetlinkSocket) -> int:
        raw = nl.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
        return int(_MEMINFO.unpack(raw)[SK_MEMINFO_DROPS])

    def poll(self, limit: int = 65_536) -> tuple[list[CtChange], bool]:
        """Queued notifications (never blocks, at most ``limit`` datagrams) and
        whether some were lost (then the caller re-dumps: :meth:`dump`)."""
        nl = self.opened()
        out: list[CtChange] = []
        lost = False
        for buf in nl.queued(limit):
            if buf is None:
                lost = True
                continue
            for kind, flags, _seq, start, end in messages(buf):
                if kind not in (CT_NEW, CT_DELETE):
                    continue
                flow = decode_entry(buf, start, end)
                if flow is None or flow.orig.proto not in self.protocols:
                    continue
                self.received += 1
                gone = kind == CT_DELETE
                new = not gone and flags & (NLM_F_CREATE | NLM_F_EXCL) != 0
                out.append(CtChange(flow, gone, bool(new)))
        drops = self._dropped(nl)
        if drops != self._drops:
            self._drops = drops
            lost = True
        if lost:
            self.lost += 1
            drain(nl.sock)
        return out, lost

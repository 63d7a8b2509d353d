"""The conntrack entries of a few addresses, without a full dump (kernel-side filter).

The start-up dump of 100,000 entries takes seconds (80 s under TCG); a MAC move
that arrives meanwhile must not wait for it (``core/startup.py``). The kernel
filters a dump by address (``CTA_FILTER``, in 6.1 and later): it still walks the
whole table, in C, but sends only the matching entries (docs/kernel-facts.md,
"Filtered conntrack dumps"). Two filters per IPv4 address: the original
source and the reply source, the two addresses the flow index keys a flow by
(``core/flowindex.py``: where each direction leaves toward).

IPv6 is not filtered by address in the kernel: 6.1 compares IPv6 filter
addresses the wrong way round (it skips the entries that match). An IPv6
address costs one dump of the IPv6 entries, filtered here. Every answer is
checked here again, whatever the kernel filtered.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

from controlplane.core.flowpath import Flow
from controlplane.kernel import netlink
from controlplane.kernel.ctnetlink.conntrack import (
    _RCVBUF,
    CT_GET,
    CT_NEW,
    CTA_IP_V4_SRC,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_REPLY,
    NETLINK_NETFILTER,
    decode_entry,
)
from controlplane.kernel.netlink import NLM_F_DUMP, NLM_F_REQUEST, nest, nla

__all__ = ["CtLookup", "encode_address_dump", "entries_of"]

CTA_FILTER = 25
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_REPLY_FLAGS = 2
CTA_FILTER_F_CTA_IP_SRC = 1 << 0
_NFGENMSG = struct.Struct("=BBH")
_U32 = struct.Struct("=I")


def encode_address_dump(seq: int, address: str | None, *, reply: bool, family: int) -> bytes:
    """A CT_GET dump of ``family``'s entries whose original (``reply`` False) or reply
    source is ``address``; ``address`` None: the whole family (no address filter).
    nfgenmsg version 1: the family is honoured (docs/netlink.md)."""
    attrs = b""
    if address is not None:
        tuple_kind, flags_kind = (
            (CTA_TUPLE_REPLY, CTA_FILTER_REPLY_FLAGS)
            if reply
            else (CTA_TUPLE_ORIG, CTA_FILTER_ORIG_FLAGS)
        )
        ip = nest(CTA_TUPLE_IP, nla(CTA_IP_V4_SRC, socket.inet_pton(socket.AF_INET, address)))
        attrs = nest(tuple_kind, ip) + nest(
            CTA_FILTER, nla(flags_kind, _U32.pack(CTA_FILTER_F_CTA_IP_SRC))
        )
    body = _NFGENMSG.pack(family, 1, 0) + attrs
    return netlink.message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def entries_of(addresses: Iterable[str], netns: str | None = None) -> list[Flow]:
    """Every entry whose original or reply source is one of ``addresses`` (any zone),
    each once."""
    wanted = {str(ipaddress.ip_address(a)) for a in addresses}
    if not wanted:
        return []
    v4 = sorted(a for a in wanted if ":" not in a)
    requests: list[tuple[str | None, bool, int]] = [
        (a, reply, socket.AF_INET) for a in v4 for reply in (False, True)
    ]
    if len(v4) < len(wanted):
        requests.append((None, False, socket.AF_INET6))
    found: dict[tuple[int, object, int], Flow] = {}

    def on_message(kind: int, buf: bytes, start: int, end: int) -> None:
        if kind != CT_NEW:
            return
        flow = decode_entry(buf, start, end)
        if flow is not None and (flow.orig.src in wanted or flow.reply.src in wanted):
            found.setdefault((flow.zone, flow.orig, flow.id), flow)

    sock = netlink.NetlinkSocket(
        NETLINK_NETFILTER, netns, rcvbuf=_RCVBUF, operation="conntrack lookup"
    )
    try:
        for address, reply, family in requests:
            sock.dump(
                "conntrack lookup",
                lambda seq, a=address, r=reply, f=family: encode_address_dump(  # type: ignore[misc]
                    seq, a, reply=r, family=f
                ),
                on_message,
            )
    finally:
        sock.close()
    return list(found.values())


class CtLookup:
    """:func:`entries_of` for one namespace (``kernel/ports.CtLookupPort``); a socket
    per look-up: they are rare (a MAC move during the start-up dump)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def entries_of(self, addresses: Iterable[str]) -> list[Flow]:
        return entries_of(addresses, self.netns)

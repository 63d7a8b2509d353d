"""Conntrack entries' packet and byte counters (CTA_COUNTERS_*), for the fast-path
totals of ``core/accounting.py``. Reads only.

The kernel fills these only when the entry has the accounting extension
(``net.netfilter.nf_conntrack_acct=1``, or a flowtable with the ``counter``
flag: docs/agent.md); without it the attributes are absent and an entry counts 0.
"""

from __future__ import annotations

import struct

from controlplane.core.accounting import Counts
from controlplane.core.flowpath import IPS_OFFLOAD
from controlplane.kernel import netlink
from controlplane.kernel.ctnetlink.conntrack import (
    _BE32,
    _HDR_LEN,
    _RCVBUF,
    CT_GET,
    CT_NEW,
    CTA_ID,
    CTA_STATUS,
    CTA_STATUS_MASK,
    NETLINK_NETFILTER,
    _message,
)
from controlplane.kernel.netlink import NLM_F_DUMP, NLM_F_REQUEST, attrs, nla

__all__ = ["decode_counters", "entry_counters"]

CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_COUNTERS_PACKETS = 1  # u64, big endian
CTA_COUNTERS_BYTES = 2
_BE64 = struct.Struct(">Q")


def decode_counters(buf: bytes, start: int, end: int) -> tuple[int, int, Counts]:
    """One CT_NEW message -> (conntrack id, status, both directions' counters)."""
    ct_id = status = packets = bytes_ = 0
    for kind, s, e in attrs(buf, start + _HDR_LEN, end):
        if kind == CTA_ID:
            ct_id = _BE32.unpack_from(buf, s)[0]
        elif kind == CTA_STATUS:
            status = _BE32.unpack_from(buf, s)[0]
        elif kind in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            for sub, ss, _se in attrs(buf, s, e):
                if sub == CTA_COUNTERS_PACKETS:
                    packets += _BE64.unpack_from(buf, ss)[0]
                elif sub == CTA_COUNTERS_BYTES:
                    bytes_ += _BE64.unpack_from(buf, ss)[0]
    return ct_id, status, (packets, bytes_)


def entry_counters(netns: str | None = None, *, only_offloaded: bool = True) -> dict[int, Counts]:
    """Conntrack id -> (packets, bytes) of every entry (offloaded ones only by
    default: the kernel filters on IPS_OFFLOAD, Linux >= 5.19, and so do we)."""
    filt = b""
    if only_offloaded:
        filt = nla(CTA_STATUS, _BE32.pack(IPS_OFFLOAD)) + nla(
            CTA_STATUS_MASK, _BE32.pack(IPS_OFFLOAD)
        )
    found: dict[int, Counts] = {}

    def encode(seq: int) -> bytes:
        return _message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, filt)

    def on_message(kind: int, buf: bytes, start: int, end: int) -> None:
        if kind == CT_NEW:
            ct_id, status, counts = decode_counters(buf, start, end)
            if not only_offloaded or status & IPS_OFFLOAD:
                found[ct_id] = counts

    with netlink.NetlinkSocket(
        NETLINK_NETFILTER, netns, rcvbuf=_RCVBUF, operation="conntrack counters"
    ) as sock:
        sock.dump("conntrack counters", encode, on_message)
    return found

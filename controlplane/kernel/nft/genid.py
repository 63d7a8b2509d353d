"""The ruleset generation id of a network namespace (NFT_MSG_GETGEN).

The kernel bumps it on every committed nftables transaction in the namespace,
whoever sent it: an unchanged id proves nothing changed since it was read.
One small netlink request (~0.1 ms), against a full listing (~50 ms at 1,000
rules), which is what lets an unchanged re-apply skip the listing safely.
"""

from __future__ import annotations

import os
import socket
import struct

from controlplane.errors import KernelError
from controlplane.kernel.netlink import (
    HDR,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkSocket,
    attrs,
    error_code,
    message,
    messages,
)

__all__ = ["ruleset_generation"]

SO_NETNS_COOKIE = 71  # Linux 5.14+: a 64-bit id no other namespace gets until reboot

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian on the wire)


def encode_getgen(seq: int) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
    return message(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST | NLM_F_ACK, seq, body
    )


def decode_newgen(buf: bytes) -> int | None:
    for kind, _flags, _seq, start, end in messages(buf):
        if kind == NLMSG_ERROR:
            code = error_code(buf, start)
            if code:
                raise KernelError("nft get generation", os.strerror(code), code)
            continue
        if kind & 0xFF == NFT_MSG_NEWGEN:
            for akind, astart, _aend in attrs(buf, start + HDR + _NFGENMSG.size, end):
                if akind == NFTA_GEN_ID:
                    gen: int = struct.unpack_from(">I", buf, astart)[0]
                    return gen
    return None


def ruleset_generation(netns: str | None = None) -> str | None:
    """``COOKIE:GENID`` of the namespace, or None where the kernel has no netns
    cookie. The cookie matters: a namespace's inode and its generation counter
    are both reused by a later namespace, the cookie is not."""
    with NetlinkSocket(NETLINK_NETFILTER, netns, operation="nft get generation") as nl:
        try:
            raw = nl.sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError:
            return None
        cookie = struct.unpack("=Q", raw)[0]
        nl.send(encode_getgen(nl.next_seq()))
        while True:
            gen = decode_newgen(nl.recv())
            if gen is not None:
                return f"{cookie}:{gen}"

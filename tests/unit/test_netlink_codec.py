"""Codecs against bytes recorded from the host kernel (6.18), no root needed.

Each constant is one message as the kernel sent it (captured in a scratch
namespace with the commands named beside it); request encoders are compared
with the exact bytes the kernel accepted in the netns tests.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core.flowpath import CtTuple, Family, Flow, Route
from controlplane.core.reinject import CtTimeouts, reinject_plan
from controlplane.errors import KernelError
from controlplane.kernel.ctnetlink import conntrack as ct
from controlplane.kernel.netlink import (
    NLMSGHDR,
    RecvBuffer,
    attrs,
    error_code,
    message,
    messages,
    nest,
    nla,
)
from controlplane.kernel.rtnl import codec
from controlplane.kernel.rtnl.topology import encode_route_get

# bridge fdb add 02:00:00:00:00:01 dev p1 master static   (p1 = if4, br0 = if2)
# (the 'add' shows the kernel's own learned entry fa:1c:ea:cf:88:52 first)
FDB_NEW = bytes.fromhex(
    "4c0000001c000000000000000000000007000000040000004000000"
    "00a0002000200000000010000"
    "080009000200000008000f00000000001400030000000000000000000000000000000000"
)
# the kernel ageing out fa:1c:ea:cf:88:52 learned on p1
FDB_DEL = bytes.fromhex(
    "4c0000001d00000000000000000000000700000004000000020000000a000200fa1ceacf88520000"
    "080009000200000008000f00000000001400030000000000020000000200000000000000"
)
# ip neigh add 10.0.1.9 lladdr 02:00:00:00:00:09 dev br0 nud permanent
NEIGH_NEW = bytes.fromhex(
    "4c0000001c000000000000002a170000020000000200000080000001080001000a0001090a000200"
    "020000000009000008000400000000001400030000000000000000000000000001000000"
)
# ip route add 198.51.100.0/24 via 10.0.1.9
ROUTE_NEW = bytes.fromhex(
    "3c0000001800000674e4016b2b17000002180000fe0300010000000008000f00fe00000008000100"
    "c6336400080005000a0001090800040002000000"
)
# ip route get 198.51.100.7 (the answer to encode_route_get)
ROUTE_GET_REPLY = bytes.fromhex(
    "70000000180000000100000085d10be802200000fe0000010002000008000f00fe00000008000100"
    "c63364070800040002000000080007000a000101080005000a000109080019000000000024000c00"
    "0200000000000000000000000000000000000000000000000000000000000000"
)
# conntrack -I -s 10.1.0.1 -d 10.2.0.1 -p tcp --sport 1234 --dport 80
#   --state ESTABLISHED -t 300 -w 7 -m 42      (as a CT_GET dump answers it)
CT_ENTRY = bytes.fromhex(
    "f800000000010200010000001f170000020000003400018014000180080001000a01000108000200"
    "0a0200011c00028005000100060000000600020004d2000006000300005000003400028014000180"
    "080001000a020001080002000a0100011c000280050001000600000006000200005000000600030004"
    "d2000006001200000700000800030000000008080008000000002a08000c003b4e59050800"
    "0b0000000001080007000000012c300004802c00018005000100030000000500020000000000050003"
    "0000000000060004000a000000060005000a0000001c001880080001000000000008000200000000"
    "000800030000000000"
)


def _one(buf: bytes) -> tuple[int, int, int]:
    [(kind, _flags, _seq, start, end)] = list(messages(buf))
    return kind, start, end


def test_framing_roundtrip_and_padding() -> None:
    attr = nla(1, b"\x01\x02\x03")
    assert attr == b"\x07\x00\x01\x00\x01\x02\x03\x00"  # length 7, padded to 8
    nested = nest(2, attr, nla(3, b""))
    assert nested[:4] == b"\x10\x00\x02\x80"  # NLA_F_NESTED set
    msg = message(0x100, 0x5, 7, b"\x00" * 4 + nested)
    [(kind, flags, seq, start, end)] = list(messages(msg))
    assert (kind, flags, seq, start, end) == (0x100, 0x5, 7, 0, len(msg))
    inner = list(attrs(msg, 20, end))
    assert [a[0] for a in inner] == [2]  # flags masked off
    assert [a[0] for a in attrs(msg, inner[0][1], inner[0][2])] == [1, 3]


def test_malformed_length_raises_rather_than_loops() -> None:
    bad = NLMSGHDR.pack(8, 2, 0, 1, 0) + b"\0" * 8  # length < header
    with pytest.raises(KernelError):
        list(messages(bad))
    ack = NLMSGHDR.pack(36, 2, 0x100, 9, 0) + (-2).to_bytes(4, "little", signed=True)
    assert error_code(ack + b"\0" * 16, 0) == 2


def test_fdb_events_decode() -> None:
    kind, s, e = _one(FDB_NEW)
    assert codec.decode(kind, FDB_NEW, s, e) == codec.FdbMsg((2, 0, "02:00:00:00:00:01"), 4)
    kind, s, e = _one(FDB_DEL)
    assert codec.decode(kind, FDB_DEL, s, e) == codec.FdbMsg((2, 0, "fa:1c:ea:cf:88:52"), None)


def test_neighbour_and_route_events_decode() -> None:
    kind, s, e = _one(NEIGH_NEW)
    assert codec.decode(kind, NEIGH_NEW, s, e) == codec.NeighMsg(
        (2, "10.0.1.9"), "02:00:00:00:00:09"
    )
    kind, s, e = _one(ROUTE_NEW)
    assert codec.decode(kind, ROUTE_NEW, s, e) == codec.RouteMsg(
        (254, socket.AF_INET, "198.51.100.0/24"), codec.RouteState(2, "10.0.1.9")
    )


def test_route_lookup_codec() -> None:
    assert encode_route_get("198.51.100.7", 1) == bytes.fromhex(
        "240000001a000100010000000000000002200000000000000000000008000100c6336407"
    )
    assert codec.decode_route_lookup(ROUTE_GET_REPLY, 0, len(ROUTE_GET_REPLY)) == Route(
        oif=2, gateway="10.0.1.9"
    )


FLOW = Flow(
    CtTuple(Family.IPV4, 6, "10.1.0.1", "10.2.0.1", 1234, 80),
    CtTuple(Family.IPV4, 6, "10.2.0.1", "10.1.0.1", 80, 1234),
    id=0x3B4E5905,
    zone=7,
    mark=42,
    status=0x8,  # IPS_CONFIRMED
)


def test_conntrack_entry_decodes() -> None:
    kind, s, e = _one(CT_ENTRY)
    assert kind == ct.CT_NEW
    assert ct.decode_entry(CT_ENTRY, s, e) == FLOW


def test_conntrack_delete_encodes_tuple_zone_and_id() -> None:
    # nlmsghdr (len 88, CT_DELETE, REQUEST|ACK, seq 3) · nfgenmsg (AF_INET, v1) ·
    # CTA_TUPLE_ORIG{ip{src,dst}, proto{6, 1234, 80}} · CTA_ZONE 7 · CTA_ID
    assert ct.encode_delete(FLOW, 3) == bytes.fromhex(
        "5800000002010500030000000000000002010000"
        "3400018014000180080001000a010001080002000a020001"
        "1c00028005000100060000000600020004d200000600030000500000"
        "0600120000070000"
        "08000c003b4e5905"
    )


def test_conntrack_create_carries_the_timeout_it_is_given() -> None:
    msg = ct.encode_create(FLOW, 4321, 9)
    kind, s, e = _one(msg)
    assert kind == ct.CT_NEW
    found = {a: msg[ps:pe] for a, ps, pe in attrs(msg, s + 20, e)}
    assert found[ct.CTA_TIMEOUT] == (4321).to_bytes(4, "big")
    assert found[ct.CTA_ZONE] == (7).to_bytes(2, "big")
    assert found[ct.CTA_MARK] == (42).to_bytes(4, "big")
    assert ct.CTA_ID not in found  # a new entry gets a new id


def test_reinject_plan_uses_the_sysctl_timeouts() -> None:
    udp = Flow(CtTuple(Family.IPV4, 17, "a", "b", 1, 2), CtTuple(Family.IPV4, 17, "b", "a", 2, 1))
    icmp = Flow(CtTuple(Family.IPV4, 1, "a", "b"), CtTuple(Family.IPV4, 1, "b", "a"))
    timeouts = CtTimeouts(tcp_established=7200, udp_stream=180)
    assert reinject_plan([FLOW, icmp, udp], timeouts) == [(FLOW, 7200), (udp, 180)]
    assert reinject_plan([FLOW], CtTimeouts(tcp_established=0)) == []


@given(
    v6=st.booleans(),
    proto=st.sampled_from([6, 17, 132]),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    raw=st.binary(min_size=32, max_size=32),
    kind=st.sampled_from([ct.CTA_TUPLE_ORIG, ct.CTA_TUPLE_REPLY]),
)
def test_packed_tuple_encoder_equals_the_attribute_builder(
    v6: bool, proto: int, sport: int, dport: int, raw: bytes, kind: int
) -> None:
    family, af, size = (
        (Family.IPV6, socket.AF_INET6, 16) if v6 else (Family.IPV4, socket.AF_INET, 4)
    )
    src, dst = socket.inet_ntop(af, raw[:size]), socket.inet_ntop(af, raw[16 : 16 + size])
    t = CtTuple(family, proto, src, dst, sport, dport)
    encoded = ct.encode_tuple(kind, t)
    assert encoded == ct._encode_tuple_generic(kind, t)
    # and the decoder's fixed-offset fast path reads it back
    assert ct._fast_tuple(encoded, 4, family) == t


def test_recv_buffer_returns_each_datagram_whole_and_independent() -> None:
    # Sizes past 64 KiB too: a link notification with many SR-IOV VFs can be that large.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx = RecvBuffer()
        sizes = [0, 1, 200, 70_000, 3]
        sent = [bytes([n % 251]) * n for n in sizes]
        for data in sent:
            a.send(data)
        got = [rx.recv(b) for _ in sizes]
        assert got == sent  # earlier results are copies, not views of the buffer

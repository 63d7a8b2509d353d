"""The flow index: compact records round-trip, prefix queries equal a brute-force scan,
and bookkeeping leaves nothing behind."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.flowindex import FlowIndex, FlowRecord
from controlplane.core.flowpath import IPS_OFFLOAD, CtTuple, Egress, Flow, Route

v4 = st.builds(
    lambda a, b: f"10.{a}.{b}.{(a * 7 + b) % 256}", st.integers(0, 3), st.integers(0, 255)
)
v6 = st.builds(lambda a, b: f"2001:db8:{a:x}::{b:x}", st.integers(0, 3), st.integers(0, 0xFFFF))
port = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    addresses = draw(st.sampled_from([v4, v6]))
    proto = draw(st.sampled_from([6, 17, 132]))
    family = 2 if addresses is v4 else 10
    src, dst, rsrc, rdst = (draw(addresses) for _ in range(4))
    return Flow(
        orig=CtTuple(family, proto, src, dst, draw(port), draw(port)),
        reply=CtTuple(family, proto, rsrc, rdst, draw(port), draw(port)),
        id=draw(u32),
        zone=draw(st.integers(0, 0xFFFF)),
        mark=draw(u32),
        status=draw(u32) | IPS_OFFLOAD,
    )


@given(flows())
def test_record_round_trip(flow: Flow) -> None:
    record = FlowRecord(flow)
    assert record.flow() == flow
    assert record.offloaded


def test_icmp_is_kept_whole() -> None:
    flow = Flow(
        orig=CtTuple(2, 1, "10.0.0.1", "10.0.0.2", icmp_id=7, icmp_type=8, icmp_code=0),
        reply=CtTuple(2, 1, "10.0.0.2", "10.0.0.1", icmp_id=7, icmp_type=0, icmp_code=0),
    )
    assert FlowRecord(flow).flow() == flow


def test_identity_is_zone_and_original_tuple() -> None:
    orig = CtTuple(2, 6, "10.0.0.1", "10.0.0.2", 1000, 80)
    reply = CtTuple(2, 6, "10.0.0.2", "10.0.0.1", 80, 1000)
    a = FlowRecord(Flow(orig=orig, reply=reply, id=1, status=IPS_OFFLOAD))
    assert a == FlowRecord(Flow(orig=orig, reply=reply, id=2, mark=9))  # id/mark/status differ
    assert hash(a) == hash(FlowRecord(Flow(orig=orig, reply=reply, id=2)))
    assert a != FlowRecord(Flow(orig=orig, reply=reply, zone=1))
    other = CtTuple(2, 6, "10.0.0.1", "10.0.0.2", 1001, 80)
    assert a != FlowRecord(Flow(orig=other, reply=reply))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(v4, v6), min_size=1, max_size=60, unique=True),
    st.lists(
        st.one_of(
            st.builds(lambda a, n: f"10.{a}.0.0/{n}", st.integers(0, 3), st.integers(0, 32)),
            st.builds(lambda a, n: f"2001:db8:{a:x}::/{n}", st.integers(0, 3), st.integers(0, 128)),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_addresses_in_prefix_equal_a_scan(addresses: list[str], prefixes: list[str]) -> None:
    index = FlowIndex()
    for n, address in enumerate(addresses):
        fam = 10 if ":" in address else 2
        peer = "2001:db8:ff::1" if fam == 10 else "10.255.0.1"
        index.add(
            FlowRecord(
                Flow(
                    orig=CtTuple(fam, 6, peer, address, n, 80),
                    reply=CtTuple(fam, 6, address, peer, 80, n),
                    status=IPS_OFFLOAD,
                )
            )
        )
    for prefix in prefixes:
        net = ipaddress.ip_network(prefix, strict=False)
        expected = {
            a
            for a in [*addresses, "10.255.0.1", "2001:db8:ff::1"]
            if a in index.addresses() and ipaddress.ip_address(a) in net
        }
        assert set(index.addresses_in(prefix)) == expected


def test_remove_leaves_nothing_behind() -> None:
    index = FlowIndex()
    records = []
    for n in range(5):
        flow = Flow(
            orig=CtTuple(2, 6, "10.0.0.2", f"198.51.100.{n % 2}", 1000 + n, 443),
            reply=CtTuple(2, 6, f"198.51.100.{n % 2}", "192.0.2.1", 443, 1000 + n),
            status=IPS_OFFLOAD,
        )
        records.append(FlowRecord(flow))
        index.add(records[-1])
    for address in index.addresses():
        moved = index.place(address, Route(oif=2, gateway="192.0.2.254"))
        assert moved is not None
        index.set_egress(moved[1], Egress(devices=(2,), neighbour=(2, "192.0.2.254")))
    assert len(index.groups()) == 1  # all behind one gateway: one group
    assert index.groups_by([(2, "192.0.2.254")]) == index.groups()
    assert len(index.flows_of("10.0.0.2")) == 5
    assert len(list(index)) == len(index) == 5  # each record once
    assert {id(r) for r in index} == {id(r) for r in records}
    for record in records:
        assert index.remove(FlowRecord(record.flow())) is record
    assert len(index) == 0
    assert index.addresses() == [] and index.groups() == []
    assert index.groups_by([2, (2, "192.0.2.254")]) == []
    assert index.addresses_in("0.0.0.0/0") == []

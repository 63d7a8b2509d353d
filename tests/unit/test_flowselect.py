"""``offloadctl flows teardown``'s selection: parsing of the selector and the choice of
flows, checked against the generated worlds of test_flowpath (whose ground truth is
the device chain each host really sits behind)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.flowpath import Flow, flow_egress_addresses
from controlplane.core.flowselect import Selector, select_flows
from tests.unit.test_flowpath import World, truth, world_and_flows


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("mac", "02:AA:bb:00:00:01", "02:aa:bb:00:00:01"),
        ("ip", "10.0.0.1", "10.0.0.1"),
        ("ip", "2001:DB8::1", "2001:db8::1"),
        ("prefix", "10.0.0.0/8", "10.0.0.0/8"),
        ("prefix", "10.0.0.1", "10.0.0.1/32"),
        ("prefix", "2001:db8::/32", "2001:db8::/32"),
        ("dev", "eth0.100", "eth0.100"),
    ],
)
def test_parse_normalises(kind: str, value: str, expected: str) -> None:
    assert Selector.parse(kind, value).value == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value", "reason"),
    [
        ("mac", "02:aa:bb:00:00", "not a MAC"),
        ("ip", "10.0.0.256", "not an IPv4 or IPv6 address"),
        ("ip", "fe80::1%eth0", "zone"),
        ("prefix", "10.0.0.0/33", "not an IPv4 or IPv6 prefix"),
        ("prefix", "10.0.0.1/8", "host bits set (did you mean 10.0.0.0/8?)"),
        ("prefix", "2001:db8::1/32", "host bits set"),
        ("dev", "a" * 16, "not a device name"),
        ("dev", "", "not a device name"),
    ],
)
def test_parse_rejects_naming_the_flag(kind: str, value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^--{kind}: ") as caught:
        Selector.parse(kind, value)  # type: ignore[arg-type]
    assert reason in str(caught.value)


def endpoints(flow: Flow) -> tuple[str, str]:
    return flow_egress_addresses(flow)


@settings(max_examples=150, deadline=None)
@given(world_and_flows(), st.data())
def test_dev_selects_exactly_the_flows_through_the_device(
    wf: tuple[World, list[Flow]], data: st.DataObject
) -> None:
    world, flows = wf
    ifindex = data.draw(st.sampled_from(sorted(world.topology.links)))
    name = world.topology.links[ifindex].name
    picked = [f for f, _ in select_flows(flows, world.topology, Selector.parse("dev", name))]
    assert picked == [f for f in flows if ifindex in truth(world, f)]


@settings(max_examples=150, deadline=None)
@given(world_and_flows(), st.data())
def test_prefix_selects_exactly_the_forwarded_flows_with_an_endpoint_inside(
    wf: tuple[World, list[Flow]], data: st.DataObject
) -> None:
    world, flows = wf
    length = data.draw(st.integers(8, 32))
    anchor = data.draw(st.sampled_from(sorted(world.hosts)))
    network = ipaddress.ip_network(f"{anchor}/{length}", strict=False)
    selector = Selector.parse("prefix", str(network))
    picked = [f for f, _ in select_flows(flows, world.topology, selector)]
    expected = [
        f
        for f in flows
        if truth(world, f)  # forwarded, not to or from the router
        and any(ipaddress.ip_address(a) in network for a in endpoints(f))
    ]
    assert picked == expected

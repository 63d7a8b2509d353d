"""Events and actions: keyword-only, frozen, normalised, and bad input named by field."""

from __future__ import annotations

import dataclasses

import pytest

from controlplane.core.events import (
    EventsLost,
    FdbEntryChanged,
    FdbEntryRemoved,
    LinkRemoved,
    NeighbourChanged,
    NeighbourRemoved,
    RouteChanged,
    RoutesResolved,
    TearDownFlows,
)
from controlplane.core.flowpath import Route


def test_normalised() -> None:
    fdb = FdbEntryChanged(bridge=3, vlan=0, mac="02:AB:00:00:00:0F", port=4)
    assert fdb.mac == "02:ab:00:00:00:0f"
    neigh = NeighbourChanged(ifindex=3, ip="2001:DB8:0:0::1", mac="02:00:00:00:00:01")
    assert neigh.ip == "2001:db8::1"
    assert RouteChanged(prefix="10.1.2.3/8").prefix == "10.0.0.0/8"
    assert RouteChanged(prefix="2001:db8::/32").family == 10
    assert RouteChanged(prefix="0.0.0.0/0").family == 2


def test_frozen_and_keyword_only() -> None:
    event = NeighbourRemoved(ifindex=2, ip="10.0.0.1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.ip = "10.0.0.2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        NeighbourRemoved(2, "10.0.0.1")  # type: ignore[call-arg]
    resolved = RoutesResolved(routes={"10.0.0.1": Route(oif=2)})
    with pytest.raises(TypeError):
        resolved.routes["10.0.0.2"] = None  # type: ignore[index]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FdbEntryChanged(bridge=3, vlan=0, mac="02:00:00:00:00", port=4), "mac: "),
        (lambda: FdbEntryChanged(bridge=3, vlan=0, mac="zz:00:00:00:00:01", port=4), "mac: "),
        (lambda: FdbEntryChanged(bridge=3, vlan=4096, mac="02:00:00:00:00:01", port=4), "vlan: "),
        (lambda: FdbEntryChanged(bridge=0, vlan=1, mac="02:00:00:00:00:01", port=4), "bridge: "),
        (lambda: FdbEntryRemoved(bridge=3, vlan=-1, mac="02:00:00:00:00:01"), "vlan: "),
        (lambda: NeighbourChanged(ifindex=2, ip="10.0.0.256", mac="02:00:00:00:00:01"), "ip: "),
        (lambda: NeighbourRemoved(ifindex=-1, ip="10.0.0.1"), "ifindex: "),
        (lambda: LinkRemoved(ifindex=0), "ifindex: "),
        (lambda: RouteChanged(prefix="10.0.0.0/33"), "prefix: "),
        (lambda: EventsLost(source="nft"), "source: "),  # type: ignore[arg-type]
        (lambda: TearDownFlows(flows=(), causes=("x",)), "causes: "),
    ],
)
def test_bad_input_names_the_field(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        build()  # type: ignore[operator]

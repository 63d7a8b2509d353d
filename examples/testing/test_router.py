"""Test a router config before rollout: ``pytest examples/testing`` (as root).

The lab is shaped like the router: a LAN bridge br0 with a wired port lan0 (host "lan") and
a VLAN 20 port lan1.20 (host "iot", tagging on its eth0), an uplink wan0 to a server. Each
test gets a fresh copy with router.yaml applied through offloadctl's API. The tests need
flowtables and VLAN devices: on a kernel without them they run in offloadctl's VM
(``offload_vm``), or are skipped saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.testing import Bridge, Lab, NetLab, Netns, Route, Topology, Veth, Vlan

pytestmark = pytest.mark.offload_vm

CONFIG = Path(__file__).with_name("router.yaml")
LAN_HOST, IOT_HOST, ROUTER_LAN = "10.0.1.2", "10.0.1.3", "10.0.1.1"
ROUTER_WAN, SERVER = "192.0.2.1", "192.0.2.2"
MiB = 1 << 20

ROUTER = Topology(
    namespaces={
        "lan": Netns(
            addresses={"eth0": f"{LAN_HOST}/24"},
            routes=[Route("default", ROUTER_LAN)],
        ),
        "iot": Netns(
            vlans=[Vlan("eth0.20", parent="eth0", id=20)],
            addresses={"eth0.20": f"{IOT_HOST}/24"},
            routes=[Route("default", ROUTER_LAN)],
        ),
        "router": Netns(
            forwarding=True,
            vlans=[Vlan("lan1.20", parent="lan1", id=20)],
            bridges=[Bridge("br0", ports=["lan0", "lan1.20"], address="02:00:00:00:01:01")],
            addresses={"br0": f"{ROUTER_LAN}/24", "wan0": f"{ROUTER_WAN}/24"},
        ),
        "wan": Netns(addresses={"eth0": f"{SERVER}/24"}),  # no route to the LAN: NAT or bust
    },
    links=[
        Veth("lan:eth0", "router:lan0"),
        Veth("iot:eth0", "router:lan1"),
        Veth("router:wan0", "wan:eth0"),
    ],
)


@pytest.fixture
def router(netlab: NetLab) -> Lab:
    lab = netlab.build(ROUTER)
    lab.apply("router", CONFIG)
    return lab


def test_lan_to_wan_is_offloaded_and_masqueraded(router: Lab) -> None:
    with router.capture("wan", "eth0") as wire:
        conn = router.tcp("lan", "wan", SERVER, 443)
        conn.exchange(1 * MiB)  # byte-exact both ways
        router.wait_offloaded("router", conn)  # conntrack's [OFFLOAD], as `flows` reads it
    assert conn.server_saw[0] == ROUTER_WAN
    assert wire.seen(src=ROUTER_WAN, dport=443) > 0
    assert wire.seen(src=LAN_HOST) == 0 and wire.seen(dst=LAN_HOST) == 0


def test_vlan_bridge_port_is_offloaded_both_ways(router: Lab) -> None:
    conn = router.tcp("iot", "wan", SERVER, 8443)
    conn.exchange(64 * 1024)
    router.wait_offloaded("router", conn)
    # [OFFLOAD] is per flow; per direction, count what still takes the classic path.
    classic = router.classic_path("router")
    conn.exchange(4 * MiB)
    seen = classic.read()
    assert seen["br0"].bytes < 256 * 1024, f"upload (iot -> wan) on the classic path: {seen}"
    assert seen["wan0"].bytes < 256 * 1024, f"download (wan -> iot) on the classic path: {seen}"


def test_port_forward_is_reachable(router: Lab) -> None:
    conn = router.tcp("wan", "lan", ROUTER_WAN, 8080, listen=(LAN_HOST, 80))
    conn.exchange(1 * MiB)
    assert conn.server == (LAN_HOST, 80)
    assert conn.server_saw[0] == SERVER  # DNAT only: the LAN host sees the real client
    udp = router.udp("lan", "wan", SERVER, 5353)
    udp.exchange(20)  # and UDP from the LAN still goes out, masqueraded
    assert udp.server_saw[0] == ROUTER_WAN

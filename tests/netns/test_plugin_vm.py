"""The plugin's topologies that the host kernel cannot build (VLAN filtering, QinQ), built
and offloaded in the VM through ``offload_vm`` (run by ``make example-test``; ``make
netns`` passes ``--offload-vm=never`` and lists it as skipped)."""

from __future__ import annotations

import json

import pytest

from controlplane.testing import Bridge, Lab, NetLab, Netns, Route, Topology, Veth, Vlan

pytestmark = pytest.mark.offload_vm

WAN = "192.0.2.2"
TOPOLOGY = Topology(
    namespaces={
        "tagged": Netns(  # on VLAN 10 of a VLAN-filtering bridge, L3 on br0.10
            vlans=[Vlan("eth0.10", parent="eth0", id=10)],
            addresses={"eth0.10": ["10.0.1.2/24", "fd00:1::2/64"]},
            routes=[Route("default", "10.0.1.1"), Route("default6", "fd00:1::1")],
        ),
        "qinq": Netns(  # 802.1ad 100 + 802.1Q 10, routed
            vlans=[
                Vlan("eth0.100", parent="eth0", id=100, protocol="802.1ad"),
                Vlan("eth0.100.10", parent="eth0.100", id=10),
            ],
            addresses={"eth0.100.10": "10.0.3.2/24"},
            routes=[Route("default", "10.0.3.1")],
        ),
        "router": Netns(
            forwarding=True,
            bridges=[Bridge("br0", ports=["lan0"], vlan_filtering=True, tagged={"lan0": [10]})],
            vlans=[
                Vlan("br0.10", parent="br0", id=10),
                Vlan("lan1.100", parent="lan1", id=100, protocol="802.1ad"),
                Vlan("lan1.100.10", parent="lan1.100", id=10),
            ],
            addresses={
                "br0.10": ["10.0.1.1/24", "fd00:1::1/64"],
                "lan1.100.10": "10.0.3.1/24",
                "wan0": ["192.0.2.1/24", "fd00:2::1/64"],
            },
        ),
        "wan": Netns(
            addresses={"eth0": [f"{WAN}/24", "fd00:2::2/64"]},
            routes=[Route("default", "192.0.2.1"), Route("default6", "fd00:2::1")],
        ),
    },
    links=[
        Veth("tagged:eth0", "router:lan0"),
        Veth("qinq:eth0", "router:lan1"),
        Veth("router:wan0", "wan:eth0"),
    ],
)
CONFIG = {
    "version": 1,
    "flowtables": [{"name": "ft", "devices": ["wan0", "lan1"], "bridges": ["br0"]}],
    "policies": [{"name": "all", "flowtable": "ft"}],
}


@pytest.fixture
def lab(netlab: NetLab) -> Lab:
    lab = netlab.build(TOPOLOGY)
    lab.apply("router", CONFIG)
    return lab


def test_vlan_filtering_membership_as_described(lab: Lab) -> None:
    vlans = json.loads(lab.sh("router", "bridge", "-j", "vlan", "show"))
    by_port = {p["ifname"]: sorted(v["vlan"] for v in p["vlans"]) for p in vlans}
    assert by_port["lan0"] == [10]  # tagged 10, out of the default VLAN 1
    assert 10 in by_port["br0"]  # the bridge itself, for br0.10


@pytest.mark.parametrize(
    ("host", "to", "entering"),
    [("tagged", WAN, "br0.10"), ("tagged", "fd00:2::2", "br0.10"), ("qinq", WAN, "lan1.100.10")],
    ids=["vlan-filtering-v4", "vlan-filtering-v6", "qinq"],
)
def test_offloaded_both_ways(lab: Lab, host: str, to: str, entering: str) -> None:
    conn = lab.tcp(host, "wan", to, 5000)
    conn.exchange(64 * 1024)
    lab.wait_offloaded("router", conn)
    classic = lab.classic_path("router")
    conn.exchange(4 << 20)
    seen = classic.read()
    assert seen[entering].bytes < 256 * 1024, seen
    assert seen["wan0"].bytes < 256 * 1024, seen

"""`plan` shows the flowtable devices derived from the topology, and why (issue 9)."""

from __future__ import annotations

from typing import Any

from controlplane.core.flowpath import Link
from controlplane.core.render import Facts
from controlplane.loader import parse_config
from controlplane.service import Ports, RulesetService
from tests.unit.fake_nft import FakeNft
from tests.unit.test_service import FakeCt, FakeLock, FakeRtnl

BR0 = Link(10, "br0", kind="bridge")
LAN0 = Link(2, "lan0", kind="veth")
VLAN_PORT = Link(11, "lan0.10", kind="vlan", master=10, lower=2, vlan_id=10)


def test_plan_explains_a_vlan_bridge_port_by_its_real_device() -> None:
    facts = Facts(
        bridge_ports={"br0": ("lan0.10",)},
        links={link.name: link for link in (BR0, LAN0, VLAN_PORT)},
    )
    events: list[str] = []
    ports: Any = Ports(
        nft=FakeNft(),
        rtnl=FakeRtnl(names={"lo", "wan0", "lan0", "lan0.10", "br0"}),
        ct=FakeCt(),
        lock=lambda: FakeLock(events),
        facts=lambda cfg: facts,
    )
    cfg = parse_config(
        {
            "version": 1,
            "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}],
            "policies": [{"name": "p", "flowtable": "ft"}],
        }
    )
    lines = RulesetService(ports).plan(cfg).devices
    assert lines[0] == "flowtable ft:"
    lan0 = next(line for line in lines if line.strip().startswith("lan0 "))
    assert "lower device of bridge port lan0.10 of br0" in lan0
    assert not any(line.strip().startswith("lan0.10 ") for line in lines)

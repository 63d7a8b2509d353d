"""gather_facts against the host kernel, and the issue-9 statements loaded into it.

The host has bridges and veths but no VLAN devices or flowtables: VLAN stacks
and offload are proven in the VM (vm-tests/suite/test_directions.py).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.core import nft
from controlplane.core.devices import explain
from controlplane.core.render import device_sets, render
from controlplane.errors import EnvironmentProblem
from controlplane.kernel.rtnl.facts import gather_facts
from controlplane.loader import load_config, parse_config
from controlplane.testing import Bridge, NetLab, Netns, Topology, Veth
from tests.netns.conftest import sh

EXAMPLES = Path(__file__).parents[2] / "nft" / "examples"


BRIDGE = Topology(
    namespaces={"ns": Netns(bridges=[Bridge("br0", ports=["p1", "p2"])])},
    links=[Veth(f"ns:{dev}", f"ns:{dev}x") for dev in ("p1", "p2", "wan0")],
)


@pytest.fixture
def bridged(netlab: NetLab) -> str:
    """br0 with ports p1, p2 (veths to p1x, p2x), and wan0 (to wan0x)."""
    return netlab.build(BRIDGE).ns("ns")


def test_bridge_ports_and_listed_devices(bridged: str) -> None:
    netns = bridged
    cfg = parse_config(
        {"version": 1, "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}]}
    )
    facts = gather_facts(cfg, netns)
    assert facts.bridge_ports == {"br0": ("p1", "p2")}
    assert facts.links["p1"].master == facts.links["br0"].ifindex
    assert facts.links["wan0"].kind == "veth"
    (ds,) = device_sets(cfg, facts)
    assert ds.names == ("p1", "p2", "wan0")
    assert dict(ds.ingress) == {"br0": ("p1", "p2"), "wan0": ("wan0",)}
    assert "  p1    (port of bridge br0)" in explain([ds])


def test_missing_or_wrong_bridge_is_an_environment_problem(bridged: str) -> None:
    netns = bridged
    for bridge, why in (("nope0", "no such device"), ("wan0", "not a bridge")):
        cfg = parse_config(
            {"version": 1, "flowtables": [{"name": "ft", "devices": [], "bridges": [bridge]}]}
        )
        with pytest.raises(EnvironmentProblem, match=why):
            gather_facts(cfg, netns)


def _load(ns: str, payload: str, as_json: bool) -> str:
    args = ["ip", "netns", "exec", ns, "nft", *(["-j"] if as_json else []), "-f", "-"]
    res = subprocess.run(args, input=payload, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return sh("nft", "list", "table", "inet", "offloadctl", netns=ns)


@pytest.mark.parametrize("example", ["default-deny", "dnat-daddr", "selftest-ports"])
def test_json_and_text_load_the_same_rules(make_netns: Callable[[], str], example: str) -> None:
    """Both grammars of the new statements (ports, ranges, ct state/status, the
    per-device counter map, DNAT by address, drop policy) land in the kernel as
    the same table. Flowtables and "flow add" are left out: the host has none."""
    rs = render(load_config(EXAMPLES / f"{example}.yaml"))
    rs = replace(rs, flowtables=(), rules=tuple(r for r in rs.rules if not r.flowtable_ref))
    a, b = make_netns(), make_netns()
    by_json = _load(a, json.dumps(nft.ruleset_json(rs)), as_json=True)
    by_text = _load(b, nft.ruleset_text(rs), as_json=False)
    assert by_json == by_text
    assert "ct status 0x4000 counter name iifname map" in by_text


def test_listed_bridge_port_is_counted_as_its_bridge(bridged: str) -> None:
    """A port listed by name: the facts carry its master, so its classic-path
    packets are counted under the bridge (what the forward hook sees)."""
    netns = bridged
    cfg = parse_config({"version": 1, "flowtables": [{"name": "ft", "devices": ["p1", "wan0"]}]})
    (ds,) = device_sets(cfg, gather_facts(cfg, netns))
    assert dict(ds.ingress) == {"br0": ("p1",), "wan0": ("wan0",)}

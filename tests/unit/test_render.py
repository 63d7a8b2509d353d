"""Renderer: goldens under nft/, and properties over random valid configs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from controlplane.core import nft
from controlplane.core.flowpath import Link
from controlplane.core.render import Facts, render
from controlplane.errors import ConfigError
from controlplane.loader import load_config, parse_config
from tests.unit.strategies import configs

ROOT = Path(__file__).parents[2] / "nft"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# Bridges in the examples resolve to these ports (the kernel tells us at apply time):
# br0's port is the VLAN device lan0.10 on lan0, so lan0 is what a flowtable hooks.
FACTS = Facts(
    bridge_ports={"br0": ("lan0.10",)},
    links={
        "br0": Link(10, "br0", kind="bridge"),
        "lan0": Link(2, "lan0", kind="veth"),
        "lan0.10": Link(11, "lan0.10", kind="vlan", master=10, lower=2, vlan_id=10),
    },
)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_golden_renderings(example: Path) -> None:
    rs = render(load_config(example), FACTS)
    got = {
        ".nft": nft.ruleset_text(rs),
        ".json": json.dumps(nft.ruleset_json(rs), indent=2) + "\n",
    }
    for suffix, text in got.items():
        golden = ROOT / "golden" / f"{example.stem}{suffix}"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.write_text(text)
        assert golden.read_text() == text, f"{golden} differs; UPDATE_GOLDEN=1 to regenerate"


def _objects_from_json(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"flowtables": {}, "chains": [], "rules": [], "counters": []}
    for cmd in doc["nftables"][1:]:
        ((kind, obj),) = cmd["add"].items()
        if kind == "flowtable":
            out["flowtables"][obj["name"]] = sorted(obj.get("dev", []))
        elif kind == "chain":
            out["chains"].append(obj["name"])
        elif kind == "rule":
            out["rules"].append((obj["chain"], obj["comment"]))
        elif kind == "counter":
            out["counters"].append(obj["name"])
    return out


def _objects_from_text(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"flowtables": {}, "chains": [], "rules": [], "counters": []}
    chain = None
    for name, body in re.findall(r"\tflowtable (\S+) \{(.*?)\n\t\}", text, re.S):
        devs = re.search(r"devices = \{ (.*?) \};", body)
        out["flowtables"][name] = (
            sorted(d.strip('"') for d in devs.group(1).split(", ")) if devs else []
        )
    for line in text.splitlines():
        if m := re.match(r"\tcounter (\S+) \{", line):
            out["counters"].append(m.group(1))
        elif m := re.match(r"\tchain (\S+) \{", line):
            chain = m.group(1)
            out["chains"].append(chain)
        elif line.startswith("\t\t") and (m := re.search(r'comment "([^"]*)"$', line)):
            out["rules"].append((chain, m.group(1)))
    return out


@settings(max_examples=150, deadline=None)
@given(configs())
def test_random_configs_render_and_both_forms_agree(data: dict[str, Any]) -> None:
    rs = render(parse_config(data))
    doc = nft.ruleset_json(rs)
    json.dumps(doc)  # serialisable
    assert _objects_from_json(doc) == _objects_from_text(nft.ruleset_text(rs))
    # every policy produced at least one rule, every rule's flowtable exists
    for r in rs.rules:
        if r.flowtable_ref is not None:
            assert rs.flowtable(r.flowtable_ref) is not None
    # tags identify rules uniquely
    assert len({r.tag for r in rs.rules}) == len(rs.rules)


def test_masquerade_adds_the_guard() -> None:
    rs = render(parse_config({"version": 1, "nat": {"masquerade": [{"oifname": "wan0"}]}}))
    guard = [r for r in rs.rules if r.chain == "input"]
    assert len(guard) == 1
    guard_text = 'iifname "wan0" ct state invalid,new tcp flags & (fin | syn | rst | ack) != syn'
    assert guard_text in guard[0].text
    rs = render(
        parse_config({"version": 1, "nat": {"guard": False, "masquerade": [{"oifname": "wan0"}]}})
    )
    assert not [r for r in rs.rules if r.chain == "input"]


def test_bridge_ports_join_the_flowtable() -> None:
    cfg = parse_config(
        {"version": 1, "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}]}
    )
    rs = render(cfg, Facts(bridge_ports={"br0": ("p2", "p1")}))
    assert rs.flowtables[0].devices == ("p1", "p2", "wan0")


def test_threshold_renders_ct_packets() -> None:
    cfg = load_config(ROOT / "examples" / "threshold.yaml")
    (policy_rule,) = [r for r in render(cfg).rules if r.flowtable_ref]
    assert "ct packets > 20" in policy_rule.text
    assert "meta l4proto tcp " in policy_rule.text


# --- issue 9: ports, DNAT by address, default-deny forward -----------------------

FT = [{"name": "ft", "devices": ["lan0", "wan0"]}]


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        (
            {"flowtables": FT, "policies": [{"name": "p", "flowtable": "ft", "dport": ["9-1"]}]},
            "policies[0].dport[0]",
            "empty port range",
        ),
        (
            {"flowtables": FT, "policies": [{"name": "p", "flowtable": "ft", "sport": [0]}]},
            "policies[0].sport[0]",
            "out of range",
        ),
        (
            {"flowtables": FT, "policies": [{"name": "p", "flowtable": "ft", "dport": [80, 80]}]},
            "policies[0].dport[1]",
            "'80' repeats '80'",
        ),
        ({"nat": {"dnat": [{"port": 80, "to": "10.0.0.1"}]}}, "nat.dnat[0].iifname", "daddr"),
        (
            {"nat": {"dnat": [{"daddr": "fd00::1", "port": 80, "to": "10.0.0.1"}]}},
            "nat.dnat[0].daddr",
            "IPv6 address but 'to' is IPv4",
        ),
        (
            {"forward": {"accept": [{"name": "a"}]}},
            "forward.accept",
            "need policy: drop",
        ),
        (
            {"forward": {"policy": "drop", "accept": [{"name": "a", "dport": [22]}]}},
            "forward.accept[0].dport",
            "protocols limited to tcp and/or udp",
        ),
        (
            {"forward": {"policy": "reject"}},
            "forward.policy",
            "",
        ),
    ],
)
def test_issue9_config_errors(data: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"version": 1, **data})
    assert any(i.path == path and fragment in i.message for i in info.value.issues), (
        info.value.issues
    )


def test_ports_render_like_nft_lists_them() -> None:
    cfg = parse_config(
        {
            "version": 1,
            "flowtables": FT,
            "policies": [
                {"name": "one", "flowtable": "ft", "protocols": ["tcp"], "dport": [12345]},
                {"name": "both", "flowtable": "ft", "dport": ["1000-2000", 22], "sport": [5]},
            ],
        }
    )
    texts = [r.text for r in render(cfg).rules if r.flowtable_ref]
    # one protocol: "tcp dport" implies it (nft drops "meta l4proto tcp" when listing)
    assert texts[0].startswith("tcp dport 12345 counter flow add @ft")
    assert texts[1].startswith("meta l4proto { tcp, udp } th dport { 1000-2000, 22 } th sport 5")


def test_default_deny_accepts_established_then_the_list() -> None:
    cfg = load_config(ROOT / "examples" / "default-deny.yaml")
    rs = render(cfg)
    (fwd,) = [c for c in rs.chains if c.name == "forward"]
    assert fwd.policy == "drop"
    labels = [r.label for r in rs.rules_of("forward")]
    # flow add before any accept: it only acts on established connections
    assert labels.index("policy lan-wan") < labels.index("accept established")
    assert labels.index("accept established") < labels.index("accept port forwards")
    assert labels[-2:] == ["accept ssh-in ipv4", "accept ssh-in ipv6"]
    ping = next(r for r in rs.rules_of("forward") if r.label == "accept ping")
    assert "meta l4proto { icmp, ipv6-icmp }" in ping.text


def test_dnat_by_destination_address() -> None:
    rs = render(load_config(ROOT / "examples" / "dnat-daddr.yaml"))
    texts = [r.text for r in rs.rules_of("dstnat")]
    assert texts[0].startswith("meta nfproto ipv4 ip daddr 10.6.6.6 tcp dport 1666 dnat ip to")
    assert texts[1].startswith('iifname "wan0" meta nfproto ipv6 ip6 daddr 2001:db8::6 udp dport')


def test_classic_path_counters_per_forward_hook_input() -> None:
    rs = render(load_config(ROOT / "examples" / "vlan-bridge-port.yaml"), FACTS)
    assert rs.flowtables[0].devices == ("lan0", "wan0")
    assert {"classic_in_br0", "classic_in_wan0", "classic_in_any_other_device"} <= set(rs.counters)
    (by_dev,) = [r for r in rs.rules if r.label.endswith("by input device")]
    assert '"br0" : "classic_in_br0"' in by_dev.text and "ct status 0x4000" in by_dev.text

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
    assert 'iifname "wan0" ct state new tcp flags & (fin | syn | rst | ack) != syn' in guard[0].text
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

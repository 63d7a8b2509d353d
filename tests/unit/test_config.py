"""Config parsing: invalid input is rejected with the right field path and line."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, given, settings

from controlplane.errors import ConfigError
from controlplane.loader import load_config, parse_config
from tests.unit.strategies import configs

EXAMPLES = sorted(Path(__file__).parents[2].joinpath("nft", "examples").glob("*.yaml"))


def _ft(**kw: Any) -> dict[str, Any]:
    return {"name": "ft", "devices": ["eth0"], **kw}


def _pol(**kw: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "flowtables": [_ft()],
        "policies": [{"name": "p", "flowtable": "ft", **kw}],
    }


# (config, expected path, words expected in the message)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({}, "version", "missing"),
    ({"version": 2}, "version", "1"),
    ({"version": 1, "bogus": 1}, "bogus", "unknown key"),
    (
        {"version": 1, "flowtables": [_ft(devices=["eth0", "x" * 16])]},
        "flowtables[0].devices[1]",
        "1-15",
    ),
    (
        {"version": 1, "flowtables": [_ft(devices=["a b"])]},
        "flowtables[0].devices[0]",
        "invalid interface",
    ),
    (
        {"version": 1, "flowtables": [_ft(devices=[".."])]},
        "flowtables[0].devices[0]",
        "invalid interface",
    ),
    (
        {"version": 1, "flowtables": [_ft(devices=["a", "b", "a"])]},
        "flowtables[0].devices[2]",
        "duplicate",
    ),
    ({"version": 1, "flowtables": [_ft(devices=[])]}, "flowtables[0].devices", "at least one"),
    ({"version": 1, "flowtables": [_ft(name="flow")]}, "flowtables[0].name", "keyword"),
    (
        {"version": 1, "flowtables": [_ft(devices=[f"d{i}" for i in range(257)])]},
        "flowtables[0].devices",
        "at most 256",
    ),
    ({"version": 1, "flowtables": [_ft(), _ft()]}, "flowtables[1]", "duplicate flowtable"),
    (
        {"version": 1, "flowtables": [_ft(), _ft(name="ft2")]},
        "flowtables[1].devices[0]",
        "already in flowtable",
    ),
    (
        {"version": 1, "policies": [{"name": "p", "flowtable": "nope"}]},
        "policies[0].flowtable",
        "unknown flowtable",
    ),
    (
        {
            "version": 1,
            "flowtables": [_ft()],
            "policies": [{"name": "p", "flowtable": "ft", "protocols": ["icmp"]}],
        },
        "policies[0].protocols[0]",
        "tcp",
    ),
    (
        {
            "version": 1,
            "flowtables": [_ft()],
            "policies": [{"name": "p", "flowtable": "ft", "min_packets": -1}],
        },
        "policies[0].min_packets",
        "greater than or equal",
    ),
    (
        {
            "version": 1,
            "flowtables": [_ft()],
            "policies": [{"name": "p", "flowtable": "ft", "saddr": ["10.0.0.1/8"]}],
        },
        "policies[0].saddr[0]",
        "host bits",
    ),
    (
        {"version": 1, "vlans": [{"name": "v", "parent": "eth0", "id": 0}]},
        "vlans[0].id",
        "greater than",
    ),
    (
        {"version": 1, "vlans": [{"name": "v", "parent": "eth0", "id": 4095}]},
        "vlans[0].id",
        "less than",
    ),
    (
        {"version": 1, "vlans": [{"name": "v", "parent": "eth0", "id": "10"}]},
        "vlans[0].id",
        "integer",
    ),
    (
        {"version": 1, "vlans": [{"name": "v", "parent": "eth0", "id": 1, "protocol": "802.1x"}]},
        "vlans[0].protocol",
        "802.1q",
    ),
    (
        {
            "version": 1,
            "vlans": [
                {"name": "a", "parent": "eth0", "id": 1},
                {"name": "b", "parent": "a", "id": 2},
                {"name": "c", "parent": "b", "id": 3},
            ],
        },
        "vlans[2].parent",
        "at most two",
    ),
    (
        {"version": 1, "vlans": [{"name": "a", "parent": "a", "id": 1}]},
        "vlans[0].parent",
        "own parent",
    ),
    (
        {"version": 1, "nat": {"dnat": [{"iifname": "wan", "port": 70000, "to": "10.0.0.1"}]}},
        "nat.dnat[0].port",
        "less than",
    ),
    (
        {"version": 1, "nat": {"snat": [{"oifname": "wan", "to": "10.0.0.300"}]}},
        "nat.snat[0].to",
        "invalid address",
    ),
    ({"version": 1, "reuseport": {"bpffs": "relative"}}, "reuseport.bpffs", "absolute"),
    ({"version": 1, "invalidation": {"watch": ["fdb", "arp"]}}, "invalidation.watch[1]", "fdb"),
    ({"version": 1, "table": {"family": "ip"}}, "table.family", "inet"),
    # -- what used to render nothing, silently (issue 7 item 5) --
    (_pol(saddr=["10.0.0.0/8"], daddr=["fd00::/8"]), "policies[0].saddr[0]", "never match"),
    (_pol(saddr=["10.0.0.0/8"], daddr=["fd00::/8"]), "policies[0].daddr[0]", "only IPv4"),
    (
        _pol(saddr=["10.0.0.0/8", "fd00::/8"], daddr=["192.0.2.0/24"]),
        "policies[0].saddr[1]",
        "IPv6 prefix can never match",
    ),
    (
        {
            "version": 1,
            "nat": {"snat": [{"oifname": "w", "to": "192.0.2.1", "saddr": ["fd00::/8"]}]},
        },
        "nat.snat[0].saddr[0]",
        "cannot be translated",
    ),
    (
        {
            "version": 1,
            "nat": {
                "snat": [{"oifname": "w", "to": "2001:db8::1", "saddr": ["fd00::/8", "10.0.0.0/8"]}]
            },
        },
        "nat.snat[0].saddr[1]",
        "IPv4 prefix cannot",
    ),
    (
        {
            "version": 1,
            "forward": {
                "policy": "drop",
                "accept": [{"name": "a", "saddr": ["10.0.0.0/8"], "daddr": ["fd00::/8"]}],
            },
        },
        "forward.accept[0].daddr[0]",
        "never match",
    ),
    (
        {
            "version": 1,
            "forward": {
                "policy": "drop",
                "accept": [{"name": "a", "protocols": ["icmpv6"], "daddr": ["10.0.0.0/8"]}],
            },
        },
        "forward.accept[0].protocols[0]",
        "IPv6 only",
    ),
    # nft merges a prefix into one that covers it: the listing would never match ours
    (_pol(saddr=["10.0.0.0/8", "10.1.0.0/16"]), "policies[0].saddr[1]", "inside '10.0.0.0/8'"),
    (_pol(daddr=["fd00:1::/64", "fd00::/16"]), "policies[0].daddr[0]", "inside 'fd00::/16'"),
    (_pol(saddr=["10.0.0.0/8", "10.0.0.0/8"]), "policies[0].saddr[1]", "duplicate prefix"),
    (
        {
            "version": 1,
            "nat": {"masquerade": [{"oifname": "w", "saddr": ["10.0.0.0/8", "10.2.0.0/16"]}]},
        },
        "nat.masquerade[0].saddr[1]",
        "inside",
    ),
    (
        {"version": 1, "nat": {"masquerade": [{"oifname": "w", "saddr": ["fe80::%wan0/64"]}]}},
        "nat.masquerade[0].saddr[0]",
        "zone id",
    ),
    (
        {"version": 1, "nat": {"snat": [{"oifname": "w", "to": "fe80::1%wan0"}]}},
        "nat.snat[0].to",
        "zone id",
    ),
    # F6 (issue 15): nft merges ports that repeat, overlap or touch a range
    (_pol(dport=[22, 22]), "policies[0].dport[1]", "'22' repeats '22'"),
    (_pol(dport=[22, "20-30"]), "policies[0].dport[0]", "'22' overlaps '20-30'"),
    (_pol(sport=["100-200", "150-160"]), "policies[0].sport[1]", "overlaps"),
    (_pol(sport=["100-200", 201]), "policies[0].sport[1]", "'201' touches '100-200'"),
    (
        {
            "version": 1,
            "forward": {
                "policy": "drop",
                "accept": [{"name": "a", "protocols": ["tcp"], "dport": [22, "22-22"]}],
            },
        },
        "forward.accept[0].dport[1]",
        "repeats",
    ),
    (
        {
            "version": 1,
            "forward": {
                "policy": "drop",
                "accept": [{"name": "a", "protocols": ["udp"], "sport": ["1-10", "5-6"]}],
            },
        },
        "forward.accept[0].sport[1]",
        "overlaps",
    ),
    ({"version": True}, "version", "integer 1"),
    ({"version": 1.0}, "version", "integer 1"),
    (
        {
            "version": 1,
            "flowtables": [_ft(bridges=["br0"]), _ft(name="b", devices=["x"], bridges=["br0"])],
        },
        "flowtables[1].bridges[0]",
        "already in flowtable",
    ),
]


@pytest.mark.parametrize(("data", "path", "words"), INVALID)
def test_invalid_configs_name_the_field(data: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    paths = {i.path: i.message for i in info.value.issues}
    assert path in paths, paths
    assert words.lower() in paths[path].lower()


def test_ports_next_to_each_other_merge_only_in_a_list_with_a_range() -> None:
    # nft keeps { 22, 23 } as listed; { 22, 23, 100-200 } becomes { 22-23, 100-200 }
    parse_config(_pol(dport=[22, 23, 25]))
    parse_config(_pol(dport=[22, 24, "100-200", "300-400"]))
    with pytest.raises(ConfigError, match="'23' touches '22'"):
        parse_config(_pol(dport=[22, 23, "100-200"]))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_valid(path: Path) -> None:
    load_config(path)


def test_yaml_errors_carry_line_numbers(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        textwrap.dedent(
            """\
            version: 1
            flowtables:
              - name: ft
                devices:
                  - eth0
                  - this-name-is-too-long
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(f)
    (issue,) = info.value.issues
    assert issue.path == "flowtables[0].devices[1]"
    assert issue.line == 6


def test_broken_yaml_and_json(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("version: 1\nflowtables: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    badj = tmp_path / "c.json"
    badj.write_text('{"version": 1,')
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(badj)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_all_errors_reported_at_once() -> None:
    data = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": ["a", "a"]}],
        "vlans": [{"name": "v", "parent": "a", "id": 0}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert {i.path for i in info.value.issues} >= {"flowtables[0].devices[1]", "vlans[0].id"}


def test_json_config_is_equivalent(tmp_path: Path) -> None:
    import json

    import yaml

    for example in EXAMPLES:
        data = yaml.safe_load(example.read_text())
        j = tmp_path / f"{example.stem}.json"
        j.write_text(json.dumps(data))
        assert load_config(j) == load_config(example)


# -- the strategies reach every part of the config, and nothing is dropped --

FEATURES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "snat": lambda c: bool(c["nat"].get("snat")),
    "snat saddr": lambda c: any("saddr" in s for s in c["nat"].get("snat", [])),
    "masquerade saddr": lambda c: any("saddr" in m for m in c["nat"].get("masquerade", [])),
    "dnat by daddr": lambda c: any("daddr" in d for d in c["nat"].get("dnat", [])),
    "guard false": lambda c: c["nat"].get("guard") is False and bool(c["nat"].get("snat")),
    "daddr": lambda c: any("daddr" in p for p in c["policies"]),
    "saddr+daddr, two families": lambda c: any(
        "saddr" in p and "daddr" in p and {":" in n for n in p["saddr"]} == {True, False}
        for p in c["policies"]
    ),
    "oifnames": lambda c: any("oifnames" in p for p in c["policies"]),
    "ports": lambda c: any("dport" in p or "sport" in p for p in c["policies"]),
    "bridges": lambda c: any(f.get("bridges") for f in c["flowtables"]),
    "vlans": lambda c: bool(c["vlans"]),
    "qinq": lambda c: bool({v["parent"] for v in c["vlans"]} & {v["name"] for v in c["vlans"]}),
    "forward accept": lambda c: bool(c.get("forward", {}).get("accept")),
}


def test_strategies_generate_every_feature() -> None:
    seen: set[str] = set()

    @settings(max_examples=300, database=None, derandomize=True, phases=[Phase.generate])
    @given(configs())
    def collect(data: dict[str, Any]) -> None:
        seen.update(name for name, has in FEATURES.items() if has(data))

    collect()
    assert seen == set(FEATURES), set(FEATURES) - seen


@settings(max_examples=200, deadline=None)
@given(configs())
def test_every_entry_renders_a_rule(data: dict[str, Any]) -> None:
    """Each policy, NAT entry and accept entry yields rules covering each of its
    prefixes: a config the parser accepts never loses a part in rendering."""
    from controlplane.core.render import render

    cfg = parse_config(data)
    rules = render(cfg).rules

    def rendered(tag: str, nets: list[Any]) -> None:
        mine = [r.text for r in rules if r.label == tag or r.label.startswith(tag + " ipv")]
        assert mine, (tag, [r.label for r in rules])
        for net in nets:
            assert any(str(net) in t for t in mine), (tag, str(net), mine)

    for pol in cfg.policies:
        rendered(f"policy {pol.name}", [*pol.saddr, *pol.daddr])
    for acc in cfg.forward.accept:
        rendered(f"accept {acc.name}", [*acc.saddr, *acc.daddr])
    for m in cfg.nat.masquerade:
        rendered(f"masquerade {m.oifname}", m.saddr)
    for s in cfg.nat.snat:
        rendered(f"snat {s.oifname}", [*s.saddr, s.to])
    for d in cfg.nat.dnat:
        assert any(
            r.label.startswith("dnat ")
            and r.label.endswith(f" {d.protocol} {d.port}")
            and str(d.to) in r.text
            for r in rules
        ), d
    guard = [r for r in rules if r.chain == "input" and r.label.startswith("nat guard")]
    assert len(guard) == int(cfg.nat.guard and bool(cfg.nat.outside_interfaces()))

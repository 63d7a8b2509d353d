"""Config parsing: invalid input is rejected with the right field path and line."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import ConfigError
from controlplane.loader import load_config, parse_config

EXAMPLES = sorted(Path(__file__).parents[2].joinpath("nft", "examples").glob("*.yaml"))


def _ft(**kw: Any) -> dict[str, Any]:
    return {"name": "ft", "devices": ["eth0"], **kw}


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
]


@pytest.mark.parametrize(("data", "path", "words"), INVALID)
def test_invalid_configs_name_the_field(data: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    paths = {i.path: i.message for i in info.value.issues}
    assert path in paths, paths
    assert words.lower() in paths[path].lower()


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

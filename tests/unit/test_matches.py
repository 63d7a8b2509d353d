"""The match table (core/matches.py): every entry has its config field and a golden.

Adding a match is one entry in ``MATCHES``, its typed field on the models of
``on`` and an example with its golden under nft/: these tests fail until all
three exist.
"""

from __future__ import annotations

import json
from functools import cache
from ipaddress import IPv4Network, ip_address
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import Config
from controlplane.core import matches, nft
from controlplane.core.matches import MATCHES, Entry, Kind, Match
from controlplane.errors import ConfigError
from controlplane.loader import load_config, parse_config

ROOT = Path(__file__).parents[2] / "nft"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
MODELS = {kind: model for model, kind in matches.KINDS.items()}
# The fields an entry has besides its matches: what it is and what it does.
NOT_MATCHES: dict[Kind, set[str]] = {"policy": {"name", "flowtable"}, "accept": {"name"}}
CASES = [(m, kind) for m in MATCHES for kind in sorted(m.on)]


def _id(case: Any) -> str:
    return f"{case[1]}.{case[0].field}" if isinstance(case, tuple) else str(case)


@cache
def _examples() -> tuple[tuple[Path, Config], ...]:
    return tuple((p, load_config(p)) for p in EXAMPLES)


def _entries(cfg: Config, kind: Kind) -> list[Entry]:
    return list(cfg.policies) if kind == "policy" else list(cfg.forward.accept)


def _exprs(golden: Path) -> list[Any]:
    doc = json.loads(golden.read_text())
    return [
        e for cmd in doc["nftables"][1:] if "rule" in cmd["add"] for e in cmd["add"]["rule"]["expr"]
    ]


@pytest.mark.parametrize("kind", sorted(NOT_MATCHES))
def test_every_match_field_of_a_model_is_in_the_table(kind: Kind) -> None:
    fields = set(MODELS[kind].model_fields) - NOT_MATCHES[kind]
    assert fields == {m.field for m in matches.of(kind)}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_every_match_is_in_a_golden(case: tuple[Match, Kind]) -> None:
    """An example sets the field on an entry of this kind, and the statement the
    table renders for it stands in that example's goldens (both grammars)."""
    m, kind = case
    for path, cfg in _examples():
        for entry in _entries(cfg, kind):
            if m.field not in entry.model_fields_set or not getattr(entry, m.field):
                continue
            built = [matches.statement(m, entry, v) for v in matches.families(entry)]
            stmts = [s for s in built if s is not None]
            assert stmts, f"{path.name}: {kind} {entry.name!r} sets {m.field} but renders no match"
            text = (ROOT / "golden" / f"{path.stem}.nft").read_text()
            exprs = _exprs(ROOT / "golden" / f"{path.stem}.json")
            assert all(s.text in text and s.json in exprs for s in stmts), path.name
            return
    pytest.fail(f"no example under nft/examples sets {m.field} on a {kind}: add one and its golden")


# --- the table's checks keep the config's one-line messages ----------------------


@pytest.mark.parametrize(
    ("entry", "path", "message"),
    [
        ({"iifnames": ["a", "a"]}, "iifnames[1]", "duplicate interface 'a' (also at [0])"),
        ({"protocols": ["tcp", "tcp"]}, "protocols[1]", "duplicate protocol 'tcp' (also at [0])"),
        ({"dport": [80, 80]}, "dport[1]", "port '80' repeats '80' (at [0])"),
        ({"saddr": ["10.0.0.0/8", "10.1.0.0/16"]}, "saddr[1]", "inside"),
        (
            {"saddr": ["10.0.0.0/8"], "daddr": ["fd00::/8"]},
            "saddr[0]",
            "IPv4 prefix can never match: daddr lists only IPv6 prefixes",
        ),
    ],
)
@pytest.mark.parametrize("kind", ["policy", "accept"])
def test_checks_name_the_field(kind: Kind, entry: dict[str, Any], path: str, message: str) -> None:
    if kind == "policy":
        data: dict[str, Any] = {
            "flowtables": [{"name": "ft", "devices": ["lan0"]}],
            "policies": [{"name": "p", "flowtable": "ft", **entry}],
        }
        prefix = "policies[0]"
    else:
        data = {
            "forward": {"policy": "drop", "accept": [{"name": "a", "protocols": ["tcp"], **entry}]}
        }
        prefix = "forward.accept[0]"
    with pytest.raises(ConfigError) as info:
        parse_config({"version": 1, **data})
    assert any(i.path == f"{prefix}.{path}" and message in i.message for i in info.value.issues), (
        info.value.issues
    )


def test_relations_are_per_kind() -> None:
    """icmp vs the prefixes' family is checked on accept entries (a policy's
    protocols are tcp/udp by type)."""
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "version": 1,
                "forward": {
                    "policy": "drop",
                    "accept": [{"name": "a", "protocols": ["icmpv6"], "saddr": ["10.0.0.0/8"]}],
                },
            }
        )
    (issue,) = info.value.issues
    assert issue.path == "forward.accept[0].protocols[0]"
    assert issue.message == "icmpv6 is IPv6 only but the prefixes are IPv4 only"


# --- the listed form: what nft prints back, built with the statement --------------


@pytest.mark.parametrize(
    ("stmt", "listed"),
    [
        (nft.match_tcp_not_syn(), "tcp flags != syn / fin,syn,rst,ack"),
        (nft.snat(ip_address("fd00::1")), "snat ip6 to fd00::1"),
        (nft.dnat(ip_address("fd00::1"), None), "dnat ip6 to fd00::1"),
        (nft.dnat(ip_address("fd00::1"), 80), "dnat ip6 to [fd00::1]:80"),
        (nft.snat(ip_address("10.0.0.1")), "snat ip to 10.0.0.1"),
        (nft.match_l4proto(["udp", "tcp"]), "meta l4proto { tcp, udp }"),
        (nft.match_meta("iifname", ["b", "a"]), 'iifname { "a", "b" }'),
    ],
    ids=lambda v: v.text if isinstance(v, nft.Stmt) else "",
)
def test_listed_forms(stmt: nft.Stmt, listed: str) -> None:
    assert stmt.listed == listed


def test_a_protocol_dependency_is_dropped_from_the_listed_rule() -> None:
    rule = nft.Rule(
        "srcnat",
        (
            nft.match_nfproto(4),
            nft.match_prefixes("saddr", [IPv4Network("10.0.0.0/8")]),
            nft.masquerade(),
        ),
        "m",
    )
    assert rule.listed.startswith("ip saddr 10.0.0.0/8 masquerade comment")
    rule = nft.Rule("srcnat", (nft.match_nfproto(4), nft.masquerade()), "m")
    assert rule.listed.startswith("meta nfproto ipv4 masquerade comment")

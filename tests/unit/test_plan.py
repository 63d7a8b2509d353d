"""Planner: content-based drift against a faithful fake table (tests/unit/fake_nft.py)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given, settings

from controlplane.core import nft
from controlplane.core.plan import make_plan, parse_listing
from controlplane.core.render import render
from controlplane.errors import KernelError
from controlplane.loader import parse_config
from tests.unit.fake_nft import FakeNft
from tests.unit.strategies import configs

REF = nft.TableRef("inet", "offloadctl")


def _cfg(devices: list[str], prio: int = 0, hw: bool = False, extra_policy: bool = False) -> Any:
    pols: list[dict[str, Any]] = [{"name": "p", "flowtable": "ft"}]
    if extra_policy:
        pols.append({"name": "q", "flowtable": "ft", "protocols": ["udp"], "min_packets": 5})
    return parse_config(
        {
            "version": 1,
            "flowtables": [{"name": "ft", "priority": prio, "devices": devices, "hw_offload": hw}],
            "policies": pols,
            "nat": {"masquerade": [{"oifname": "wan0"}]},
        }
    )


def _apply(fake: FakeNft, cfg: Any) -> Any:
    p = make_plan(render(cfg), fake.list_table(REF))
    if not p.empty:
        fake.run(p.transaction)
    return p


def _converged(fake: FakeNft, cfg: Any) -> bool:
    return make_plan(render(cfg), fake.list_table(REF)).empty


def test_unchanged_config_plans_nothing() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a", "b"]))
    runs = fake.runs
    assert _apply(fake, _cfg(["a", "b"])).empty
    assert fake.runs == runs


def test_device_changes_keep_the_flowtable() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a", "b"]))
    p = _apply(fake, _cfg(["b", "c"], extra_policy=True))
    assert fake.table is not None and fake.table.teardowns == 0
    assert fake.table.flowtables["ft"].devices == {"b", "c"}
    assert p.devices_leaving_fast_path() == {"a"}
    assert not any(isinstance(op, nft.FlushChain) and op.name == "srcnat" for op in p.ops)


def test_redefinition_recreates_in_one_transaction() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    p = _apply(fake, _cfg(["a"], prio=10))
    assert fake.table is not None and fake.table.teardowns == 1
    assert fake.table.flowtables["ft"].priority == 10
    assert any("recreated" in line for line in p.summary)


def test_untagged_rule_in_owned_chain_is_removed() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    fake.hand_add_rule("forward", "tcp dport 22 drop")
    obs = fake.list_table(REF)
    assert obs is not None and [r.text for r in obs.untagged_rules] == ["tcp dport 22 drop"]
    p = _apply(fake, _cfg(["a"]))
    assert any("added by hand" in d for d in p.drift)
    assert _converged(fake, _cfg(["a"]))
    assert fake.table is not None
    assert all("dport 22" not in r.text for r in fake.table.chains["forward"].rules)


def test_rule_changed_by_hand_with_its_tag_kept_is_restored() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    assert fake.table is not None
    rule = fake.table.chains["srcnat"].rules[0]
    tag = rule.text.split('comment "')[1]
    rule.text = f'oifname "evil0" masquerade comment "{tag}'
    p = _apply(fake, _cfg(["a"]))
    assert any("changed by hand" in d for d in p.drift)
    assert _converged(fake, _cfg(["a"]))


def test_hand_added_chain_with_a_jump_and_a_set_are_removed() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    fake.hand_add_chain("mine")
    fake.hand_add_rule("mine", "counter")
    fake.hand_add_rule("forward", "jump mine", jump="mine")
    fake.hand_add_set("blocked")
    fake.hand_add_rule("srcnat", "ip saddr @blocked drop", set_ref="blocked")
    _apply(fake, _cfg(["a"]))  # EBUSY from the fake if the order were wrong
    assert fake.table is not None
    assert "mine" not in fake.table.chains and not fake.table.sets
    assert _converged(fake, _cfg(["a"]))


def test_stale_plan_fails_instead_of_overwriting() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    stale = make_plan(render(_cfg(["b"])), fake.list_table(REF))
    _apply(fake, _cfg(["c"]))
    before = fake.list_table(REF)
    with pytest.raises(KernelError) as info:
        fake.run(stale.transaction)
    assert info.value.errno == errno.ENOENT
    assert fake.list_table(REF) == before


def test_fresh_table_carries_marker_and_serial() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    obs = fake.list_table(REF)
    assert obs is not None and obs.marker == nft.TABLE_MARKER and obs.serial == 1
    _apply(fake, _cfg(["b"]))
    obs = fake.list_table(REF)
    assert obs is not None and obs.serial == 2


# A listing recorded from the host kernel (nft 1.0.6: -a -s -y list table).
RECORDED = """table inet offloadctl { # handle 1
\tcomment "managed by offloadctl; schema 1"
\tcounter classic_path { # handle 2
\t}

\tquota q1 { # handle 12
\t\t100 mbytes
\t}

\tset offloadctl_serial { # handle 3
\t\ttype inet_service
\t\telements = { 7 }
\t}

\tchain forward { # handle 4
\t\ttype filter hook forward priority 0; policy accept;
\t\tmeta l4proto { udp, tcp } counter accept comment "cp:abc policy x" # handle 5
\t\tjump foo # handle 10
\t}

\tchain foo { # handle 8
\t\tcounter # handle 9
\t}
}
"""


def test_parse_recorded_listing() -> None:
    obs = parse_listing(RECORDED)
    assert obs.marker == nft.TABLE_MARKER
    assert obs.serial == 7 and obs.serial_handle == 3
    assert obs.counters == {"classic_path": 2}
    assert obs.objects[0].kind is nft.ObjKind.QUOTA and obs.objects[0].handle == 12
    assert obs.chains["forward"].definition == ("filter", "forward", 0, "accept")
    assert obs.chains["foo"].definition is None
    texts = [r.text for r in obs.rules_of("forward")]
    first = 'meta l4proto { tcp, udp } counter accept comment "cp:abc policy x"'
    assert texts == [first, "jump foo"]
    assert obs.rules_of("forward")[0].tag == "abc" and obs.rules_of("forward")[1].tag is None
    assert not obs.unknown


@settings(max_examples=100, deadline=None)
@given(configs(), configs())
def test_any_transition_converges(a: dict[str, Any], b: dict[str, Any]) -> None:
    fake = FakeNft()
    _apply(fake, parse_config(a))
    _apply(fake, parse_config(b))  # raises KernelError on an order the kernel refuses
    assert _converged(fake, parse_config(b))
    survivors = {f["name"] for f in a["flowtables"]} & {f["name"] for f in b["flowtables"]}
    kept = [
        n
        for n in survivors
        if render(parse_config(a)).flowtable(n).definition  # type: ignore[union-attr]
        == render(parse_config(b)).flowtable(n).definition  # type: ignore[union-attr]
    ]
    assert fake.table is not None or not b["flowtables"]
    if fake.table is not None:
        assert fake.table.teardowns == len({f["name"] for f in a["flowtables"]}) - len(kept)

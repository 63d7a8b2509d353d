"""Planner: against a faithful fake table (tests/unit/fake_nft.py)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings

from controlplane.core import nft
from controlplane.core.plan import make_plan
from controlplane.core.render import render
from controlplane.loader import parse_config
from tests.unit.fake_nft import FakeNft
from tests.unit.strategies import configs


def _cfg(devices: list[str], prio: int = 0, hw: bool = False, extra_policy: bool = False) -> Any:
    pols = [{"name": "p", "flowtable": "ft"}]
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
    p = make_plan(render(cfg), fake.observed())
    if not p.empty:
        fake.run(p.transaction)
    return p


def test_unchanged_config_plans_nothing() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a", "b"]))
    assert make_plan(render(_cfg(["a", "b"])), fake.observed()).empty


def test_device_changes_keep_the_flowtable() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a", "b"]))
    p = _apply(fake, _cfg(["b", "c"], extra_policy=True))
    kinds = [type(op).__name__ for op in p.ops]
    assert "DeleteFlowtable" not in kinds
    assert fake.table is not None and fake.table.teardowns == 0
    assert fake.table.flowtables["ft"].devices == {"b", "c"}
    assert p.devices_leaving_fast_path() == {"a"}
    assert p.transaction.needs_text  # device removal has no JSON form in nft 1.0.x
    # the unchanged chains were not touched
    assert not any(isinstance(op, nft.FlushChain) and op.name == "srcnat" for op in p.ops)


def test_redefinition_recreates_in_one_transaction() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    p = _apply(fake, _cfg(["a"], prio=10))
    assert fake.table is not None and fake.table.teardowns == 1
    assert fake.table.flowtables["ft"].priority == 10
    assert any("recreated" in line for line in p.summary)


def test_foreign_rule_in_owned_chain_is_replaced() -> None:
    fake = FakeNft()
    _apply(fake, _cfg(["a"]))
    assert fake.table is not None
    stray = nft.Rule("forward", (nft.verdict("drop"),), "hand-made")
    fake.table.rules["forward"].append(stray)
    obs = fake.observed()
    assert obs is not None
    # a hand-added rule without our tag changes the plan
    fake.table.rules["forward"][-1] = stray
    p = make_plan(render(_cfg(["a"])), obs)
    assert not p.empty


@settings(max_examples=100, deadline=None)
@given(configs(), configs())
def test_any_transition_converges(a: dict[str, Any], b: dict[str, Any]) -> None:
    fake = FakeNft()
    _apply(fake, parse_config(a))
    _apply(fake, parse_config(b))  # raises FakeKernelError on a bad order
    assert make_plan(render(parse_config(b)), fake.observed()).empty
    # flowtables whose definition survived the transition were never deleted
    # (teardowns only count redefinitions and removals)

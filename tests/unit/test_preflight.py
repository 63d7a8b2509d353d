"""Preflight decisions (core/preflight.py, pure) over facts, and the service running
the same preflight for plan, apply --check and apply (issue 14)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import preflight
from controlplane.core.preflight import KernelFacts, LinkInfo
from controlplane.core.render import render
from controlplane.errors import EnvironmentProblem, ExitCode, UnsupportedError
from controlplane.loader import load_text, parse_config
from controlplane.service import RulesetService
from tests.unit.fake_nft import FakeNft
from tests.unit.test_service import FakeRtnl, _ports

LINKS = {n: LinkInfo(None) for n in ("lo", "wan0", "lan0", "br0")}

CONFIG = """\
version: 1
policies:
  - {name: p, flowtable: ft, iifnames: [lan0], oifnames: [wan0]}
flowtables: [{name: ft, devices: [wan0]}]
forward:
  policy: drop
  accept:
    - {name: out, iifnames: [br0], oifnames: [wan0]}
nat:
  masquerade: [{oifname: wan0}]
  snat: [{oifname: wan0, to: 192.0.2.1}]
  dnat: [{iifname: wan0, port: 80, to: 10.0.0.2}]
"""


def _check(text: str, links: dict[str, LinkInfo] = LINKS, **facts: Any) -> list[Any]:
    from controlplane.loader import line_of

    cfg = load_text(text, "c.yaml")
    return preflight.check(
        cfg, render(cfg), KernelFacts(links, **facts), lambda loc: line_of(cfg, loc)
    )


def test_known_names_pass() -> None:
    assert _check(CONFIG) == []


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("masquerade: [{oifname: wan0}]", "masquerade: [{oifname: wan9}]",
         "nat.masquerade[0].oifname (line 10)"),
        ("snat: [{oifname: wan0,", "snat: [{oifname: wan9,", "nat.snat[0].oifname (line 11)"),
        ("dnat: [{iifname: wan0,", "dnat: [{iifname: wan9,", "nat.dnat[0].iifname (line 12)"),
        ("iifnames: [br0]", "iifnames: [wan9]", "forward.accept[0].iifnames[0] (line 8)"),
        ("oifnames: [wan0]}\nflow", "oifnames: [wan9]}\nflow", "policies[0].oifnames[0] (line 3)"),
    ],
)  # fmt: skip
def test_an_unknown_interface_names_field_line_and_the_devices(
    old: str, new: str, field: str
) -> None:
    text = CONFIG.replace(old, new, 1)
    assert text != CONFIG
    with pytest.raises(EnvironmentProblem) as info:
        _check(text, netns="ns1")
    assert info.value.exit_code == ExitCode.ENVIRONMENT
    assert str(info.value) == (
        f"{field}: interface 'wan9' does not exist in network namespace 'ns1'"
        " (devices: br0, lan0, wan0; a trailing * matches by prefix)"
    )


def test_a_wildcard_is_allowed_and_reported_as_such() -> None:
    text = CONFIG.replace("masquerade: [{oifname: wan0}]", 'masquerade: [{oifname: "wan*"}]')
    assert _check(text) == []
    cfg = load_text(text, "c.yaml")
    from controlplane.loader import line_of

    notes = preflight.wildcard_notes(cfg, ["lo", "wan0", "wan1"], lambda loc: line_of(cfg, loc))
    assert notes == [
        "nat.masquerade[0].oifname (line 10): 'wan*' is a wildcard; matches wan0, wan1 now"
    ]


def test_a_declared_vlan_counts_as_present() -> None:
    text = CONFIG.replace("dnat: [{iifname: wan0,", "dnat: [{iifname: wan0.7,") + (
        "vlans: [{name: wan0.7, parent: wan0, id: 7}]\n"
    )
    assert [v.name for v in _check(text)] == ["wan0.7"]


def test_vlans_to_create_on_a_kernel_without_8021q_is_exit_3() -> None:
    text = CONFIG + "vlans: [{name: wan0.7, parent: wan0, id: 7}]\n"
    with pytest.raises(UnsupportedError) as info:
        _check(text, vlans_supported=False, vlans_reason="no 8021q")
    assert str(info.value) == "vlans[0] (line 13): cannot create vlan wan0.7: no 8021q"
    assert info.value.exit_code == ExitCode.UNSUPPORTED
    # An existing VLAN needs no support from the kernel.
    have = LINKS | {"wan0.7": LinkInfo("vlan", 7, 0x8100, "wan0")}
    assert _check(text, have, vlans_supported=False) == []


@given(st.sampled_from(["wan9", "lan1", "eth0", "x"]), st.booleans())
def test_every_matched_name_is_checked(name: str, wildcard: bool) -> None:
    """Whatever field holds it, a name no device has is refused unless a wildcard."""
    shown = name + ("*" if wildcard else "")
    for loc_text in ("masquerade: [{oifname: %s}]", "dnat: [{iifname: %s, port: 1, to: 10.0.0.1}]"):
        data: dict[str, Any] = {"version": 1, "nat": {}}
        key = "masquerade" if "masq" in loc_text else "dnat"
        rule = (
            {"oifname": shown}
            if key == "masquerade"
            else {"iifname": shown, "port": 1, "to": "10.0.0.1"}
        )
        data["nat"][key] = [rule]
        cfg = parse_config(data)
        facts = KernelFacts(LINKS)
        if wildcard:
            assert preflight.check(cfg, render(cfg), facts) == []
        else:
            with pytest.raises(EnvironmentProblem, match=f"interface '{name}' does not exist"):
                preflight.check(cfg, render(cfg), facts)


def test_plan_and_check_run_the_vlan_preflight_apply_runs() -> None:
    cfg = parse_config(
        {
            "version": 1,
            "nat": {"masquerade": [{"oifname": "wan0"}]},
            "vlans": [{"name": "wan0.7", "parent": "wan0", "id": 7}],
        }
    )
    rtnl = FakeRtnl(vlan_support=(False, "kernel refused a VLAN device: no 8021q support"))
    for action in ("plan", "check", "apply"):
        fake = FakeNft()
        svc = RulesetService(_ports(fake, rtnl)[0])
        with pytest.raises(UnsupportedError, match="no 8021q"):
            if action == "plan":
                svc.plan(cfg)
            else:
                svc.apply(cfg, check=action == "check")
        assert fake.runs == 0 and rtnl.created == []


def test_agent_owner_problem() -> None:
    agent = {"table": "inet offloadctl", "pid": 42, "config_path": "/etc/a.yaml",
             "drift_check_seconds": 10.0}  # fmt: skip
    problem = preflight.agent_owner_problem("inet offloadctl", agent, "ns1", force=False)
    assert problem == (
        "table inet offloadctl in network namespace 'ns1' is managed by the offloadctl agent"
        " (pid 42, config /etc/a.yaml): edit that file and run 'offloadctl reload', or pass"
        " --force (the agent then restores its config within 10.0 s)"
    )
    assert preflight.agent_owner_problem("inet offloadctl", agent, None, force=True) is None
    assert preflight.agent_owner_problem("inet other", agent, None, force=False) is None
    assert preflight.agent_owner_problem("inet offloadctl", None, None, force=False) is None

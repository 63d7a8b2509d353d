"""Issue 7 in the Debian 6.1 kernel (flowtables): the text transport expresses
flowtable flags and device removal, every example (flow add rules included) is
listed by nft exactly as we render it, the table marker survives on 6.1."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.core import nft
from controlplane.core.plan import make_plan
from controlplane.core.render import render
from controlplane.kernel.nft.libnft import Nft
from controlplane.loader import load_config

EXAMPLES = Path(__file__).parents[2] / "nft" / "examples"


def sh(*args: str) -> str:
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    assert res.returncode == 0, (args, res.stderr)
    return res.stdout


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"trust-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def _devices(ns: str, names: set[str]) -> None:
    for dev in sorted(names):
        peer = f"p{uuid.uuid4().hex[:8]}"
        sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer)


def test_every_example_listed_as_rendered(ns: str) -> None:
    ctx = Nft(ns)
    for example in sorted(EXAMPLES.glob("*.yaml")):
        rs = render(load_config(example))
        # hardware offload needs a NIC that supports it; veths do not
        rs = replace(rs, flowtables=tuple(replace(f, hw_offload=False) for f in rs.flowtables))
        wanted = {d for f in rs.flowtables for d in f.devices}
        _devices(ns, wanted - _names(ns))
        ctx.run(make_plan(rs, None).transaction)
        observed = ctx.list_table(rs.ref)
        assert observed is not None and observed.marker == nft.TABLE_MARKER
        for chain in rs.chains:
            listed = [r.text for r in observed.rules_of(chain.name)]
            assert listed == [r.listed for r in rs.rules_of(chain.name)], example.name
        for f in rs.flowtables:
            o = observed.flowtables[f.name]
            assert (o.devices, o.definition) == (frozenset(f.devices), f.definition), example.name
        assert make_plan(rs, observed).empty, example.name
        ctx.run(nft.Transaction(rs.ref, (nft.DeleteTable(),)))


def _names(ns: str) -> set[str]:
    out = sh("ip", "-n", ns, "-o", "link")
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_device_removal_and_flags_through_the_text_transport(ns: str) -> None:
    _devices(ns, {"a0", "b0", "c0"})
    ctx = Nft(ns)
    ref = nft.TableRef("inet", "offloadctl")

    def ruleset(devices: tuple[str, ...]) -> nft.Ruleset:
        ft = nft.Flowtable("ft", 0, devices, counter=True)
        chain = nft.Chain("forward", "filter", nft.Hook.FORWARD, 0)
        rule = nft.Rule("forward", (nft.flow_add("ft"),), "offload")
        return nft.Ruleset(ref.family, ref.table, (ft,), (), (chain,), (rule,))

    ctx.run(make_plan(ruleset(("a0", "b0")), None).transaction)
    plan = make_plan(ruleset(("a0", "c0")), ctx.list_table(ref))
    assert any(isinstance(op, nft.DeleteFlowtableDevices) for op in plan.ops)
    ctx.run(plan.transaction)
    observed = ctx.list_table(ref)
    assert observed is not None
    assert observed.flowtables["ft"].devices == {"a0", "c0"}
    assert observed.flowtables["ft"].counter is True
    assert make_plan(ruleset(("a0", "c0")), observed).empty


def test_hand_added_objects_beside_a_flowtable_are_removed(ns: str) -> None:
    """Issue 15 (F4, F5) on the kernel with flowtables: a hand-added flowtable,
    map, verdict map jumping to a hand chain, ct helper and a dormant flag are
    all removed in one transaction; our flowtable is kept (not recreated)."""
    _devices(ns, {"a0", "b0", "h0"})
    ctx = Nft(ns)
    ref = nft.TableRef("inet", "offloadctl")
    ft = nft.Flowtable("ft", 0, ("a0", "b0"))
    chain = nft.Chain("forward", "filter", nft.Hook.FORWARD, 0)
    rule = nft.Rule("forward", (nft.flow_add("ft"),), "offload")
    rs = nft.Ruleset(ref.family, ref.table, (ft,), (), (chain,), (rule,))
    ctx.run(make_plan(rs, None).transaction)
    before = ctx.list_table(ref)
    assert before is not None
    sh(
        "ip", "netns", "exec", ns, "nft",
        "add flowtable inet offloadctl hft { hook ingress priority 10; devices = { h0 }; };"
        " add chain inet offloadctl hc; add rule inet offloadctl hc flow add @hft;"
        " add map inet offloadctl vm { type ipv4_addr : verdict; };"
        " add element inet offloadctl vm { 192.0.2.9 : jump hc };"
        " add rule inet offloadctl forward ip saddr vmap @vm;"
        ' add ct helper inet offloadctl h { type "ftp" protocol tcp; };'
        " add table inet offloadctl { flags dormant; }",
    )  # fmt: skip
    plan = make_plan(rs, ctx.list_table(ref))
    assert not any(isinstance(op, nft.DeleteTable) for op in plan.ops)  # piecewise
    ctx.run(plan.transaction)
    after = ctx.list_table(ref)
    assert after is not None and not after.objects and not after.flags
    assert set(after.flowtables) == {"ft"} and set(after.chains) == {"forward"}
    assert after.flowtables["ft"].handle == before.flowtables["ft"].handle  # kept
    assert make_plan(rs, after).empty

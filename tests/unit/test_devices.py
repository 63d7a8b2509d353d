"""Flowtable devices derived from the topology (core/devices.py): tables and properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.config import Flowtable
from controlplane.core.devices import (
    CLASSIC_IN_OTHER,
    LinkFacts,
    classic_counter_names,
    classic_path_report,
    derive_devices,
    explain,
    unhooked_directions,
)
from controlplane.core.flowpath import ETH_P_8021AD, Link
from controlplane.errors import EnvironmentProblem

BR0 = Link(10, "br0", kind="bridge")
LAN0 = Link(2, "lan0", kind="veth")
WAN0 = Link(3, "wan0", kind="veth")
VLAN_PORT = Link(11, "lan0.10", kind="vlan", master=10, lower=2, vlan_id=10)
QINQ_OUTER = Link(12, "lan0.100", kind="vlan", lower=2, vlan_id=100, vlan_protocol=ETH_P_8021AD)
QINQ_PORT = Link(13, "lan0.100.10", kind="vlan", master=10, lower=12, vlan_id=10)
ROUTED_VLAN = Link(14, "lan0.20", kind="vlan", lower=2, vlan_id=20)
PLAIN_PORT = Link(4, "lan1", kind="veth", master=10)


def facts(*links: Link) -> LinkFacts:
    ports = tuple(sorted(link.name for link in links if link.master == 10))
    return LinkFacts(bridge_ports={"br0": ports}, links={link.name: link for link in links})


def ft(**kw: Any) -> Flowtable:
    return Flowtable(name="ft", **kw)


# (case, flowtable, facts, expected {device: reason fragment}, note fragment or None)
CASES = [
    (
        "vlan bridge port contributes its real device",
        ft(devices=["wan0"], bridges=["br0"]),
        facts(BR0, LAN0, WAN0, VLAN_PORT),
        {"lan0": "lower device of bridge port lan0.10 of br0", "wan0": "listed"},
        None,
    ),
    (
        "qinq bridge port: two hops down",
        ft(devices=["wan0"], bridges=["br0"]),
        facts(BR0, LAN0, WAN0, QINQ_OUTER, QINQ_PORT),
        {"lan0": "bridge port lan0.100.10 of br0 (through lan0.100)", "wan0": "listed"},
        None,
    ),
    (
        "plain bridge port is itself",
        ft(devices=["wan0"], bridges=["br0"]),
        facts(BR0, WAN0, PLAIN_PORT),
        {"lan1": "port of bridge br0", "wan0": "listed"},
        None,
    ),
    (
        "listed vlan bridge port is resolved, with a note",
        ft(devices=["lan0.10", "wan0"]),
        facts(BR0, LAN0, WAN0, VLAN_PORT),
        {"lan0": "lower device of lan0.10", "wan0": "listed"},
        "devices[0]: lan0.10 is a VLAN device and a port of br0",
    ),
    (
        "routed vlan device is kept as listed",
        ft(devices=["lan0.20", "wan0"]),
        facts(LAN0, WAN0, ROUTED_VLAN),
        {"lan0.20": "listed", "wan0": "listed"},
        None,
    ),
    (
        "two ports on one real device: one member, two reasons",
        ft(bridges=["br0"]),
        facts(BR0, LAN0, VLAN_PORT, Link(15, "lan0.30", kind="vlan", master=10, lower=2)),
        {"lan0": "lan0.30 of br0"},
        None,
    ),
    (
        "unknown devices (no facts) are taken as named",
        ft(devices=["x0"], bridges=["br0"]),
        LinkFacts(bridge_ports={"br0": ("p1",)}),
        {"x0": "listed", "p1": "port of bridge br0"},
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "flowtable", "lf", "expected", "note"), CASES, ids=[c[0] for c in CASES]
)
def test_derivation_table(
    case: str, flowtable: Flowtable, lf: LinkFacts, expected: dict[str, str], note: str | None
) -> None:
    ds = derive_devices(flowtable, lf, "flowtables[0]")
    assert ds.names == tuple(sorted(expected))
    for m in ds.members:
        assert any(expected[m.name] in r for r in m.reasons), (m, expected[m.name])
    if note is None:
        assert ds.notes == ()
    else:
        assert len(ds.notes) == 1 and note in ds.notes[0]
        assert ds.notes[0].startswith("flowtables[0].")
    text = "\n".join(explain([ds]))
    assert all(name in text for name in expected)


def test_bridge_traffic_is_counted_as_the_bridge() -> None:
    ds = derive_devices(ft(devices=["wan0"], bridges=["br0"]), facts(BR0, LAN0, WAN0, VLAN_PORT))
    assert dict(ds.ingress) == {"br0": ("lan0",), "wan0": ("wan0",)}


def test_lower_device_in_another_namespace_is_refused() -> None:
    orphan = Link(11, "lan0.10", kind="vlan", master=10, lower=99)
    with pytest.raises(EnvironmentProblem, match=r"lower device \(ifindex 99\) is not in this"):
        derive_devices(ft(bridges=["br0"]), facts(BR0, orphan))


def test_counter_names_are_object_names_and_unique() -> None:
    names = classic_counter_names(["lan0.10", "lan0_10", "wan0", "a-b"])
    assert len(set(names.values())) == 4
    assert names["wan0"] == "classic_in_wan0"
    assert all("." not in n for n in names.values())
    assert CLASSIC_IN_OTHER not in names.values()


def test_report_flags_only_the_leaking_ingress() -> None:
    report = classic_path_report(
        {
            "classic_path": (9000, 1),
            "classic_in_br0": (4256, 300_000),
            "classic_in_wan0": (3, 200),
            CLASSIC_IN_OTHER: (0, 0),
        }
    )
    assert [(r.ingress, r.suspect) for r in report] == [
        ("br0", True),
        ("(other)", False),
        ("wan0", False),
    ]


def test_report_with_a_baseline_shows_growth() -> None:
    now = {"classic_in_br0": (1000, 50_000), "classic_in_wan0": (900, 40_000)}
    before = {"classic_in_br0": (10, 500), "classic_in_wan0": (899, 39_990)}
    report = classic_path_report(now, threshold=25, baseline=before)
    assert [(r.ingress, r.packets, r.suspect) for r in report] == [
        ("br0", 990, True),
        ("wan0", 1, False),
    ]


def test_unhooked_directions() -> None:
    paths: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
        "f1": (("wan0",), ("br0", "lan0.10", "lan0")),  # LAN host behind a VLAN bridge port
        "f2": (("wan0",), ("lan1",)),
    }
    # The LAN→WAN (orig) direction of f1 enters through br0: br0 is the suspect input.
    assert unhooked_directions(paths, {"br0"}) == {"f1": ("orig",)}
    assert unhooked_directions(paths, {"lan0_10"}) == {"f1": ("orig",)}
    assert unhooked_directions(paths, {"wan0"}) == {"f1": ("reply",), "f2": ("reply",)}
    assert unhooked_directions(paths, set()) == {}


# --- properties over random link graphs -----------------------------------------


@st.composite
def link_graphs(draw: st.DrawFn) -> tuple[LinkFacts, Flowtable]:
    """Real devices, VLANs stacked at most two deep on them, bridges whose ports
    are real or VLAN devices; a flowtable naming some devices and bridges."""
    links: dict[int, Link] = {}
    idx = 1
    reals = []
    for i in range(draw(st.integers(1, 4))):
        links[idx] = Link(idx, f"eth{i}", kind=draw(st.sampled_from(["veth", "", "bond"])))
        reals.append(idx)
        idx += 1
    vlans: list[int] = []
    for i in range(draw(st.integers(0, 5))):
        lower = draw(st.sampled_from(reals + [v for v in vlans if links[v].lower in reals]))
        links[idx] = Link(idx, f"v{i}", kind="vlan", lower=lower, vlan_id=i + 1)
        vlans.append(idx)
        idx += 1
    bridges = []
    for i in range(draw(st.integers(0, 2))):
        links[idx] = Link(idx, f"br{i}", kind="bridge")
        bridges.append(idx)
        idx += 1
    ports: dict[str, list[str]] = {links[b].name: [] for b in bridges}
    if bridges:
        for dev in draw(st.lists(st.sampled_from(reals + vlans), unique=True)):
            b = draw(st.sampled_from(bridges))
            old = links[dev]
            links[dev] = Link(
                old.ifindex, old.name, kind=old.kind, master=b, lower=old.lower,
                vlan_id=old.vlan_id,
            )  # fmt: skip
            ports[links[b].name].append(old.name)
    names = [link.name for link in links.values() if link.kind != "bridge"]
    listed = draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
    chosen = draw(st.lists(st.sampled_from(sorted(ports) or ["br9"]), unique=True, max_size=2))
    chosen = [b for b in chosen if b in ports]
    if not listed and not chosen:
        listed = [names[0]]
    lf = LinkFacts(
        bridge_ports={b: tuple(sorted(p)) for b, p in ports.items()},
        links={link.name: link for link in links.values()},
    )
    return lf, Flowtable(name="ft", devices=listed, bridges=chosen)


def _lowest(link: Link, by_index: dict[int, Link]) -> Link:
    while link.kind == "vlan" and link.lower is not None:
        link = by_index[link.lower]
    return link


@settings(max_examples=300, deadline=None)
@given(link_graphs())
def test_derived_sets_follow_the_kernel_path(graph: tuple[LinkFacts, Flowtable]) -> None:
    lf, flowtable = graph
    by_index = lf.by_index()
    ds = derive_devices(flowtable, lf)
    got = set(ds.names)
    assert list(ds.names) == sorted(got)  # sorted, unique
    for m in ds.members:
        assert m.reasons
        link = lf.links[m.name]
        # A member is never a VLAN device that is a bridge port (it cannot be a hook).
        assert not (link.kind == "vlan" and link.master is not None)
        # A VLAN member can only be one the user listed (a routed VLAN device).
        if link.kind == "vlan":
            assert m.name in flowtable.devices
    # Every bridge port contributes exactly its lowest real device.
    for bridge in flowtable.bridges:
        for port in lf.bridge_ports[bridge]:
            assert _lowest(lf.links[port], by_index).name in got
    # Every listed device is hooked, or resolved (with a note) when it is a VLAN port.
    for j, dev in enumerate(flowtable.devices):
        link = lf.links[dev]
        if link.kind == "vlan" and link.master is not None:
            assert _lowest(link, by_index).name in got
            assert any(n.startswith(f"devices[{j}]: {dev} ") for n in ds.notes)
        else:
            assert dev in got
    # Nothing else: every member comes from a listed device or a bridge port.
    sources = {
        _lowest(lf.links[p], by_index).name for b in flowtable.bridges for p in lf.bridge_ports[b]
    } | {
        _lowest(lf.links[d], by_index).name if lf.links[d].master is not None else d
        for d in flowtable.devices
    }
    assert got == sources
    # Every member is counted under exactly one forward-hook input device... or
    # several (a device listed and also under a bridge); never none.
    counted = {d for _, devs in ds.ingress for d in devs}
    assert counted == got

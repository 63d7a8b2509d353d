"""``core/explain``: every reason a flow is off the fast path, over generated worlds.

A generated world starts healthy (a LAN client behind a bridge port, plain or a
VLAN sub-interface, a server behind a routed WAN device, plain or VLAN; a
matching policy; the right devices hooked; an established TCP or a UDP entry)
and then has some conditions broken on purpose. The property: explain names
exactly the broken conditions, and a healthy offloaded flow gets no reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.config import OffloadPolicy
from controlplane.core.devices import SUSPECT_PACKETS
from controlplane.core.explain import (
    CtInfo,
    TableFacts,
    World,
    explain_device,
    explain_flow,
    status_verdict,
)
from controlplane.core.flowpath import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_HW_OFFLOAD,
    IPS_OFFLOAD,
    IPS_SEEN_REPLY,
    CtTuple,
    Family,
    Flow,
    Link,
    Route,
    Topology,
)

CLIENT, SERVER, ROUTER_WAN, GATEWAY = "10.0.1.2", "203.0.113.2", "198.51.100.2", "198.51.100.1"
CLIENT_MAC, GW_MAC = "02:00:00:00:01:02", "02:00:00:00:02:01"


@dataclass(frozen=True)
class Lab:
    topology: Topology
    lan_port: str  # the bridge port (p1 or p1.10)
    lan_hook: str  # the device the flowtable must hook for it (p1)
    wan: str  # the routed device (wan or wan.5)
    wan_hooks: tuple[str, ...]  # devices that work as its hook


def lab(vlan_port: bool, vlan_wan: bool) -> Lab:
    links = {10: Link(10, "br0", "bridge"), 11: Link(11, "p1", master=None if vlan_port else 10)}
    port = 11
    if vlan_port:
        links[12] = Link(12, "p1.10", "vlan", master=10, lower=11, vlan_id=10)
        port = 12
    links[20] = Link(20, "wan")
    wan = 20
    if vlan_wan:
        links[21] = Link(21, "wan.5", "vlan", lower=20, vlan_id=5)
        wan = 21
    topo = Topology(
        links=links,
        neighbours={(10, CLIENT): CLIENT_MAC, (wan, GATEWAY): GW_MAC},
        fdb={(10, 0, CLIENT_MAC): port},
        routes={
            CLIENT: Route(10),
            SERVER: Route(wan, GATEWAY),
            ROUTER_WAN: Route(None, local=True),
        },
    )
    wan_hooks = ("wan.5", "wan") if vlan_wan else ("wan",)
    return Lab(topo, links[port].name, "p1", links[wan].name, wan_hooks)


def flow(proto: int, sport: int, dport: int, status: int) -> Flow:
    return Flow(
        CtTuple(Family.IPV4, proto, CLIENT, SERVER, sport, dport),
        CtTuple(Family.IPV4, proto, SERVER, ROUTER_WAN, dport, sport),
        id=7,
        status=status,
    )


def policy(**fields: Any) -> OffloadPolicy:
    return OffloadPolicy.model_validate({"name": "lan-wan", "flowtable": "ft", **fields})


HEALTHY_TCP = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED
OFFLOAD_FAULTS = ("device", "classic_path")
CLASSIC_FAULTS = ("kernel", "device", "policy", "min_packets", "ct_state")


@st.composite
def worlds(draw: st.DrawFn) -> tuple[World, Flow, CtInfo, frozenset[str], bool]:
    the_lab = lab(draw(st.booleans()), draw(st.booleans()))
    proto = draw(st.sampled_from([6, 17]))
    sport = draw(st.integers(32768, 60999))
    dport = draw(st.integers(1, 1023))
    offloaded = draw(st.booleans())
    pool = OFFLOAD_FAULTS if offloaded else CLASSIC_FAULTS
    faults = set(draw(st.sets(st.sampled_from(pool))))
    if proto != 6:
        faults.discard("ct_state")  # UDP has no state the kernel waits for
    if "policy" in faults:
        faults.discard("min_packets")  # a policy that fails a field never gets that far

    hooks = {the_lab.lan_hook, *the_lab.wan_hooks}
    device_side = draw(st.sampled_from(["lan", "wan"]))
    if "device" in faults:
        if device_side == "lan":
            # Either not at all, or the classic mistake: the VLAN port itself.
            hooks.discard(the_lab.lan_hook)
            if the_lab.lan_port != the_lab.lan_hook and draw(st.booleans()):
                hooks.add(the_lab.lan_port)
        else:
            hooks -= set(the_lab.wan_hooks)
    elif the_lab.wan == "wan.5" and draw(st.booleans()):
        hooks.discard(draw(st.sampled_from(the_lab.wan_hooks)))  # either one is enough

    counters = {"classic_in_br0": draw(st.integers(0, SUSPECT_PACKETS))}
    counters[f"classic_in_{the_lab.wan.replace('.', '_')}"] = draw(st.integers(0, SUSPECT_PACKETS))
    if "classic_path" in faults:
        # On the side whose hook is in place (the other one is the device fault).
        side = "wan" if device_side == "lan" or "device" not in faults else "lan"
        name = "classic_in_br0" if side == "lan" else f"classic_in_{the_lab.wan.replace('.', '_')}"
        counters[name] = draw(st.integers(SUSPECT_PACKETS + 1, 10**9))

    fields: dict[str, Any] = {
        "protocols": draw(st.sampled_from([["tcp", "udp"], ["tcp" if proto == 6 else "udp"]])),
    }
    if draw(st.booleans()):
        fields["iifnames"] = ["br0"]
    if draw(st.booleans()):
        fields["oifnames"] = [the_lab.wan]
    if draw(st.booleans()):
        fields["saddr"] = ["10.0.1.0/24"]
    if draw(st.booleans()):
        fields["dport"] = [dport]
    min_packets = draw(st.integers(0, 50))
    fields["min_packets"] = min_packets
    if "policy" in faults:
        broken = draw(st.sampled_from(["protocols", "iifnames", "oifnames", "saddr", "dport"]))
        fields[broken] = {
            "protocols": ["udp" if proto == 6 else "tcp"],
            "iifnames": ["lan9"],
            "oifnames": ["wan9"],
            "saddr": ["10.9.0.0/16"],
            "dport": [1024],
        }[broken]
    packets: tuple[int, int] | None
    if "min_packets" in faults:
        fields["min_packets"] = max(min_packets, 1)
        need = fields["min_packets"]
        total = draw(st.one_of(st.just(need), st.integers(0, need)))  # "> N": N is not enough
        packets = (total - total // 2, total // 2)
    else:
        total = draw(st.integers(min_packets + 1, min_packets + 10**6))
        packets = (total - total // 2, total // 2)
        if min_packets == 0 and draw(st.booleans()):
            packets = None  # no accounting: fine when nothing waits for a count

    status = HEALTHY_TCP if proto == 6 else draw(st.sampled_from([IPS_CONFIRMED, HEALTHY_TCP]))
    tcp_state = "ESTABLISHED" if proto == 6 else None
    if "ct_state" in faults:
        tcp_state, status = draw(
            st.sampled_from(
                [
                    ("SYN_SENT", IPS_CONFIRMED),
                    ("TIME_WAIT", HEALTHY_TCP),
                    ("ESTABLISHED", IPS_SEEN_REPLY | IPS_CONFIRMED),
                ]
            )
        )
    if offloaded:
        status |= IPS_OFFLOAD | (IPS_HW_OFFLOAD if draw(st.booleans()) else 0)
    kernel = (False, "no flowtable support") if "kernel" in faults else (True, "ok")
    world = World(
        kernel,
        TableFacts(True, {"ft": frozenset(hooks)}, counters),
        the_lab.topology,
        (policy(**fields),),
    )
    return (
        world,
        flow(proto, sport, dport, status),
        CtInfo(tcp_state, packets),
        frozenset(faults),
        offloaded,
    )


@settings(max_examples=400, deadline=None)
@given(worlds())
def test_explain_names_exactly_the_broken_conditions(
    case: tuple[World, Flow, CtInfo, frozenset[str], bool],
) -> None:
    world, the_flow, ct, faults, offloaded = case
    got = explain_flow(world, the_flow, ct)
    assert {r.code for r in got.reasons} == faults, got.lines()
    assert got.fast_path == (offloaded and not faults)
    assert got.offloaded == offloaded
    assert len(got.reasons) == len({(r.code, r.text) for r in got.reasons})


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_every_reason_is_in_the_json_with_its_evidence(
    case: tuple[World, Flow, CtInfo, frozenset[str], bool],
) -> None:
    world, the_flow, ct, _faults, _ = case
    doc = explain_flow(world, the_flow, ct).as_dict()
    reasons = doc["reasons"]
    assert isinstance(reasons, list)
    assert all(r["text"] and isinstance(r["evidence"], dict) for r in reasons)


def healthy(vlan_port: bool = False, **policy_fields: Any) -> tuple[World, Lab]:
    the_lab = lab(vlan_port, False)
    world = World(
        (True, "ok"),
        TableFacts(True, {"ft": frozenset({"p1", "wan"})}, {"classic_in_br0": 0}),
        the_lab.topology,
        (policy(**policy_fields),),
    )
    return world, the_lab


def test_vlan_bridge_port_names_its_lower_device() -> None:
    world, _ = healthy(vlan_port=True)
    world = replace(world, table=TableFacts(True, {"ft": frozenset({"p1.10", "wan"})}))
    got = explain_flow(world, flow(6, 40000, 80, HEALTHY_TCP | IPS_OFFLOAD))
    (reason,) = got.reasons
    assert reason.code == "device"
    assert reason.text == (
        "orig direction: bridged path br0 > p1.10 > p1: the kernel hooks p1; p1 is not in ft"
    )
    dev = explain_device(world, "p1.10")
    assert [r.text for r in dev.reasons] == [
        "p1.10 is a VLAN bridge port: the kernel hooks its real device p1;"
        " p1 is not in any flowtable"
    ]


def test_policy_reason_names_policy_field_and_direction() -> None:
    world, _ = healthy(dport=[443, "8000-8080"])
    got = explain_flow(world, flow(6, 40000, 9000, HEALTHY_TCP), CtInfo("ESTABLISHED", (5, 5)))
    (reason,) = got.reasons
    assert reason.text == "policy lan-wan: dport: 9000 not in 443, 8000-8080 (orig direction)"
    assert reason.evidence["fields"] == ["dport: 9000 not in 443, 8000-8080"]


def test_min_packets_gives_the_count_so_far_or_says_it_is_unknown() -> None:
    world, _ = healthy(min_packets=20)
    got = explain_flow(world, flow(17, 40000, 53, IPS_CONFIRMED), CtInfo(None, (3, 0)))
    assert [r.text for r in got.reasons] == [
        "policy lan-wan: offloads after more than 20 packets; seen so far: 3"
    ]
    got = explain_flow(world, flow(17, 40000, 53, IPS_CONFIRMED), CtInfo(None, None))
    assert got.reasons[0].text.endswith("seen so far: unknown (no conntrack accounting)")


def test_unreplied_tcp_says_why() -> None:
    world, _ = healthy()
    got = explain_flow(world, flow(6, 40000, 80, IPS_CONFIRMED), CtInfo("SYN_SENT", (1, 0)))
    (reason,) = got.reasons
    assert reason.text.startswith(
        "conntrack: TCP state SYN_SENT, no reply seen yet, not ASSURED (the kernel offloads TCP"
        " only once ESTABLISHED and ASSURED"
    )


def test_nothing_wrong_but_not_offloaded_says_so_in_a_note() -> None:
    world, _ = healthy()
    got = explain_flow(world, flow(17, 40000, 53, IPS_CONFIRMED), CtInfo(None, (1, 0)))
    assert not got.reasons and not got.fast_path
    assert got.notes[-1].startswith("every condition holds")


@pytest.mark.parametrize(
    ("mutate", "code", "text"),
    [
        (
            lambda f: replace(
                f, orig=replace(f.orig, dst=ROUTER_WAN), reply=replace(f.reply, src=ROUTER_WAN)
            ),
            "not_forwarded",
            f"{ROUTER_WAN} is this router's own address",
        ),
        (
            lambda f: replace(f, reply=replace(f.reply, src="192.0.2.9")),
            "unroutable",
            "no route to 192.0.2.9",
        ),
        (
            lambda f: replace(f, orig=replace(f.orig, proto=1), reply=replace(f.reply, proto=1)),
            "protocol",
            "protocol 1: the kernel offloads only TCP and UDP",
        ),
    ],
)
def test_flows_that_can_never_offload(mutate: Any, code: str, text: str) -> None:
    world, _ = healthy()
    got = explain_flow(world, mutate(flow(6, 40000, 80, HEALTHY_TCP)))
    assert [r.code for r in got.reasons] == [code]
    assert got.reasons[0].text.startswith(text)


def test_kernel_and_table_reasons_and_unknown_policies() -> None:
    world, _ = healthy()
    bare = replace(
        world, kernel=(False, "add flowtable: No such file or directory"), table=TableFacts()
    )
    got = explain_flow(bare, flow(6, 40000, 80, HEALTHY_TCP))
    assert [r.text for r in got.reasons] == [
        "the kernel cannot offload: add flowtable: No such file or directory",
        "the table is absent: nothing offloads",
    ]
    got = explain_flow(replace(world, policies=None), flow(6, 40000, 80, HEALTHY_TCP))
    assert got.notes[0].startswith("policies not checked: no config")


def test_device_explain_of_a_bridge_checks_every_port() -> None:
    world, _ = healthy()
    assert explain_device(world, "br0").fast_path
    assert explain_device(world, "p1").fast_path
    got = explain_device(replace(world, table=TableFacts(True, {"ft": frozenset({"wan"})})), "br0")
    assert [r.text for r in got.reasons] == [
        "bridge port p1: p1 must be hooked; p1 is not in any flowtable"
    ]
    assert [r.text for r in explain_device(world, "nosuch0").reasons] == [
        "no device nosuch0 in this namespace"
    ]


def test_status_verdict_line() -> None:
    assert status_verdict((False, "no flowtables"), {"ft": ["wan", "p1"]}, 9, 0, 0, {}) == (
        "kernel CANNOT offload (no flowtables); flowtable ft { p1, wan }; 0 of 9 forwarded"
        " flows offloaded; classic-path packets of offloaded flows: none counted"
    )
    assert status_verdict((True, "ok"), {}, 3, 2, 1, {"br0": 4, "wan": 0}) == (
        "kernel can offload; no flowtable; 2 of 3 forwarded flows offloaded (1 in hardware);"
        " classic-path packets of offloaded flows: br0 4, wan 0"
    )


def test_remaining_texts() -> None:
    world, _ = healthy()
    hot = replace(world, table=TableFacts(True, world.table.flowtables, {"classic_in_wan": 4000}))
    got = explain_flow(hot, flow(6, 40000, 80, HEALTHY_TCP | IPS_OFFLOAD | IPS_HW_OFFLOAD))
    assert [r.text for r in got.reasons] == [
        "reply direction enters through wan, where 4000 packets of offloaded flows took the"
        " classic path (counter classic_in_wan; more than 32 means that direction is not"
        " offloaded)"
    ]
    assert got.lines()[0].endswith(": NOT on the fast path ([OFFLOAD] [HW_OFFLOAD])")
    got = explain_flow(replace(world, policies=()), flow(17, 40000, 53, IPS_CONFIRMED))
    assert [r.text for r in got.reasons] == ["no offload policy in the config"]
    bare = replace(world, table=TableFacts(True, {}))
    assert [r.text for r in explain_flow(bare, flow(17, 1, 2, 0)).reasons] == [
        "the table has no flowtable: nothing offloads"
    ]
    # No FDB entry for the client: the LAN side is not fully known, and said so.
    the_lab = lab(False, False)
    unknown = replace(the_lab.topology, fdb={})
    got = explain_flow(
        replace(world, topology=unknown), flow(6, 40000, 80, HEALTHY_TCP | IPS_OFFLOAD)
    )
    assert got.fast_path
    assert got.notes == (
        "orig direction: path not fully known (missing neighbour or FDB entry); its hook is"
        " not checked",
    )


def test_flow_line_and_summary() -> None:
    from controlplane.cli.flows import flow_line, flows_summary

    doc: dict[str, Any] = {
        "id": 9, "zone": 5, "proto": 6, "src": CLIENT, "sport": 40000, "dst": SERVER,
        "dport": 443, "offloaded": True, "hw_offloaded": True, "tcp_state": "ESTABLISHED",
        "packets": [10, 8], "orig_devices": ["wan"], "reply_devices": ["br0", "p1"],
        "ambiguous": False,
        "classic_in": {"orig": {"ingress": "br0", "packets": 3},
                       "reply": {"ingress": "wan", "packets": 0}},
    }  # fmt: skip
    assert flow_line(doc) == (
        f"tcp {CLIENT}:40000 -> {SERVER}:443 zone=5 id=9 [OFFLOAD] [HW_OFFLOAD] ESTABLISHED"
        " packets=10/8 out=wan back=br0>p1 classic-in: br0 3, wan 0"
    )
    plain = doc | {"offloaded": False, "hw_offloaded": False, "tcp_state": None, "packets": None}
    del plain["classic_in"]
    assert flow_line(plain) == (
        f"tcp {CLIENT}:40000 -> {SERVER}:443 zone=5 id=9 classic out=wan back=br0>p1"
    )
    assert flows_summary([doc, plain]) == "1 of 2 forwarded flow(s) offloaded (1 in hardware)"


def test_status_line_reads_both_shapes() -> None:
    from controlplane.core.explain import status_line

    counters = {
        "classic_in_br0": {"packets": 7, "bytes": 1},
        "classic_in_any_other_device": {"packets": 0, "bytes": 0},
        "classic_path": {"packets": 99, "bytes": 1},
    }
    cli_shape = {
        "kernel": {"can_offload": True, "reason": "ok"},
        "flowtables": [{"name": "ft", "devices": ["p1", "wan"]}],
        "counters": counters,
        "forwarded_flows": 3,
        "forwarded_offloaded": 2,
    }
    agent_shape = cli_shape | {"flowtables": {"ft": ("p1", "wan")}}
    expected = (
        "kernel can offload; flowtable ft { p1, wan }; 2 of 3 forwarded flows offloaded;"
        " classic-path packets of offloaded flows: br0 7"
    )
    assert status_line(cli_shape) == status_line(agent_shape) == expected


def test_parse_tuple() -> None:
    from controlplane.cli.explain import parse_tuple
    from controlplane.errors import ConfigError

    assert parse_tuple(["udp", "[FD00::2]:53", "->", "10.0.0.1:80"]) == (
        17, "fd00::2", 53, "10.0.0.1", 80,
    )  # fmt: skip
    for words, field in [
        (["tcp", "10.0.0.1:1"], "FLOW"),
        (["tcp", "10.0.0.1:1", "10.0.0.2:70000"], "FLOW destination"),
        (["tcp", "10.0.0.300:1", "10.0.0.2:7"], "FLOW source"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_tuple(words)
        assert caught.value.issues[0].path == field


def test_policies_come_from_the_agents_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from controlplane.cli import agent as cli_agent
    from controlplane.cli.explain import _policies

    cfg = tmp_path / "agent.yaml"
    cfg.write_text("version: 1\nflowtables: [{name: ft, devices: [wan]}]\n"
                   "policies: [{name: all, flowtable: ft}]\n")  # fmt: skip
    sha = hashlib.sha256(cfg.read_bytes()).hexdigest()
    doc = {"config_path": str(cfg), "config_sha256": sha}
    monkeypatch.setattr(cli_agent, "agent_answer", lambda *_a, **_k: doc)
    policies, table, source = _policies(None, None, None)
    assert [p.name for p in policies or ()] == ["all"] and table == "offloadctl"
    assert source == f"the agent's config {cfg}"
    doc["config_sha256"] = "0" * 64
    assert _policies(None, None, None)[2] == (
        f"the agent's config {cfg} (changed since the agent loaded it: its running"
        " policies may differ)"
    )
    monkeypatch.setattr(cli_agent, "agent_answer", lambda *_a, **_k: None)
    assert _policies(None, None, None) == (None, "offloadctl", "no config")

"""Why a flow (or a device) is or is not on the fast path: every reason, each from evidence.

Pure: the facts (conntrack entry, topology, the live table, the kernel's
capability, the config's policies) are gathered by ``kernel/explain.py``; this
module only reasons over them, the way the kernel decides (docs/explain.md
cites each rule):

- ``nft_flow_offload_eval`` (6.1) offloads a confirmed TCP or UDP entry on a
  packet that a ``flow add`` rule sees: TCP only once ESTABLISHED *and*
  ASSURED (``nf_conntrack_tcp_established``), never with a helper, sequence
  adjustment or a NAT clash; UDP from its second packet, replied or not;
- the rule sees the packet in the forward hook, so flows to or from the router
  itself never offload, and the policy's ``iifname``/``oifname``/addresses/ports
  are those of one direction as the forward hook sees it (after DNAT, before
  SNAT): a policy offloads the flow when either direction matches it;
- ``ct packets > N`` (``min_packets``) counts both directions;
- a flowtable only takes packets entering one of its devices: the real device
  under a bridge port for a bridged path, the routed device (or its real
  device) otherwise (``core/devices.py``); an offloaded flow whose entering
  device is not hooked keeps that direction on the classic path, which the
  ruleset's ``classic_in_*`` counters show.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from controlplane.config import OffloadPolicy
from controlplane.core.devices import (
    CLASSIC_IN_OTHER,
    SUSPECT_PACKETS,
    classic_counter_of,
    classic_path_report,
)
from controlplane.core.flowpath import (
    IPS_ASSURED,
    IPS_HW_OFFLOAD,
    IPS_NAT_CLASH,
    IPS_OFFLOAD,
    IPS_SEEN_REPLY,
    IPS_SEQ_ADJUST,
    Egress,
    Flow,
    Topology,
    egress,
    flow_egress_addresses,
)

__all__ = [
    "CtInfo",
    "Explanation",
    "Reason",
    "TableFacts",
    "World",
    "explain_device",
    "explain_flow",
    "required_hooks",
    "status_line",
    "status_verdict",
]

IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}

Code = Literal[
    "kernel",
    "not_forwarded",
    "unroutable",
    "protocol",
    "no_table",
    "device",
    "policy",
    "min_packets",
    "ct_state",
    "classic_path",
]
Direction = Literal["orig", "reply"]


@dataclass(frozen=True, slots=True)
class CtInfo:
    """What conntrack says of an entry beyond tuples and status bits.

    ``packets``: (original, reply) packet counters; None when the namespace
    keeps no accounting (``nf_conntrack_acct`` off and no ``ct packets`` rule).
    """

    tcp_state: str | None = None
    packets: tuple[int, int] | None = None
    helper: str | None = None


@dataclass(frozen=True)
class TableFacts:
    """The owned table as the kernel holds it: flowtable devices by flowtable,
    and the ``classic_in_*`` counters (packets by counter name)."""

    present: bool = False
    flowtables: Mapping[str, frozenset[str]] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)

    @property
    def hooked(self) -> frozenset[str]:
        return frozenset().union(*self.flowtables.values()) if self.flowtables else frozenset()


@dataclass(frozen=True)
class World:
    """Everything explain reasons over. ``kernel``: (can offload, why);
    ``policies``: the config's, or None when no config was given."""

    kernel: tuple[bool, str]
    table: TableFacts
    topology: Topology
    policies: tuple[OffloadPolicy, ...] | None = None


@dataclass(frozen=True)
class Reason:
    code: Code
    text: str
    evidence: Mapping[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "text": self.text, "evidence": dict(self.evidence)}


@dataclass(frozen=True)
class Explanation:
    """``fast_path``: offloaded and nothing keeps a direction on the classic path."""

    subject: str
    offloaded: bool
    hw_offloaded: bool
    fast_path: bool
    reasons: tuple[Reason, ...] = ()
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "offloaded": self.offloaded,
            "hw_offloaded": self.hw_offloaded,
            "fast_path": self.fast_path,
            "reasons": [r.as_dict() for r in self.reasons],
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        head = "on the fast path" if self.fast_path else "NOT on the fast path"
        bits = "[OFFLOAD]" if self.offloaded else "no [OFFLOAD]"
        if self.hw_offloaded:
            bits += " [HW_OFFLOAD]"
        out = [f"{self.subject}: {head} ({bits})"]
        out += [f"  reason ({r.code}): {r.text}" for r in self.reasons]
        out += [f"  note: {n}" for n in self.notes]
        return out


# --- flows --------------------------------------------------------------------


def required_hooks(chain: Egress, topology: Topology) -> tuple[frozenset[str], str]:
    """Devices a flowtable may hook to take packets that *enter* through ``chain``
    (the other direction's egress chain, top device first), and why.

    Bridged path: only the last device (the real device under the FDB port),
    the kernel's direct-transmit ingress. Routed: the route's device or the
    real device under it (a routed VLAN device works either way).
    """
    names = [topology.name(i) for i in chain.devices]
    if not names:
        return frozenset(), "no device"
    if chain.bridged:
        via = " > ".join(names)
        return frozenset({names[-1]}), f"bridged path {via}: the kernel hooks {names[-1]}"
    if len(names) > 1:
        return frozenset({names[0], names[-1]}), f"routed through {' > '.join(names)}"
    return frozenset(names), f"routed through {names[0]}"


@dataclass(frozen=True, slots=True)
class _View:
    """One direction's packet as the forward hook sees it."""

    direction: Direction
    iif: str
    oif: str
    saddr: str
    daddr: str
    sport: int
    dport: int


def _views(flow: Flow, out: Egress, back: Egress, topology: Topology) -> tuple[_View, _View]:
    # Forward hook: after DNAT (prerouting), before SNAT (postrouting); a reply
    # is de-masqueraded in prerouting and de-DNATed in postrouting.
    o, r = flow.orig, flow.reply
    out_dev = topology.name(out.devices[0])
    back_dev = topology.name(back.devices[0])
    return (
        _View("orig", back_dev, out_dev, o.src, r.src, o.sport, r.sport),
        _View("reply", out_dev, back_dev, r.src, o.src, r.sport, o.sport),
    )


def _name_in(name: str, patterns: Iterable[str]) -> bool:
    return any(p == name or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def _in_prefixes(address: str, prefixes: Iterable[object]) -> bool:
    addr = ipaddress.ip_address(address)
    return any(
        isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network)
        and n.version == addr.version
        and addr in n
        for n in prefixes
    )


def _in_ports(port: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def _ports_text(ranges: Iterable[tuple[int, int]]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def policy_failures(pol: OffloadPolicy, proto: int, view: _View) -> list[str]:
    """The fields of ``pol`` that ``view``'s packet fails (min_packets aside)."""
    fails: list[str] = []
    name = PROTO_NAMES.get(proto, str(proto))
    if name not in pol.protocols:
        fails.append(f"protocols: {name} not in {', '.join(pol.protocols)}")
    checks: tuple[tuple[str, Any, Any, Callable[[Any, Any], bool], str], ...] = (
        ("iifnames", view.iif, pol.iifnames, _name_in, ", ".join(pol.iifnames)),
        ("oifnames", view.oif, pol.oifnames, _name_in, ", ".join(pol.oifnames)),
        ("saddr", view.saddr, pol.saddr, _in_prefixes, ", ".join(map(str, pol.saddr))),
        ("daddr", view.daddr, pol.daddr, _in_prefixes, ", ".join(map(str, pol.daddr))),
        ("sport", view.sport, pol.sport, _in_ports, _ports_text(pol.sport)),
        ("dport", view.dport, pol.dport, _in_ports, _ports_text(pol.dport)),
    )
    for field_name, value, allowed, matches, shown in checks:
        if allowed and not matches(value, allowed):
            fails.append(f"{field_name}: {value} not in {shown}")
    return fails


def _policy_reasons(
    policies: tuple[OffloadPolicy, ...], flow: Flow, views: tuple[_View, _View], ct: CtInfo
) -> tuple[list[Reason], set[str]]:
    """(reasons, flowtables of the policies the flow matches)."""
    proto = flow.orig.proto
    matched: list[OffloadPolicy] = []
    failed: list[Reason] = []
    for pol in policies:
        per_view = [(v, policy_failures(pol, proto, v)) for v in views]
        if any(not fails for _, fails in per_view):
            matched.append(pol)
            continue
        view, fails = min(per_view, key=lambda vf: len(vf[1]))
        failed.append(
            Reason(
                "policy",
                f"policy {pol.name}: {'; '.join(fails)} ({view.direction} direction)",
                {"policy": pol.name, "direction": view.direction, "fields": fails},
            )
        )
    if not policies:
        return [Reason("policy", "no offload policy in the config", {"policies": 0})], set()
    if not matched:
        return failed, set()
    tables = {p.flowtable for p in matched}
    total = None if ct.packets is None else ct.packets[0] + ct.packets[1]
    if any(p.min_packets == 0 or (total is not None and total > p.min_packets) for p in matched):
        return [], tables
    need = min(p.min_packets for p in matched)
    names = ", ".join(p.name for p in matched)
    seen = "unknown (no conntrack accounting)" if total is None else str(total)
    return [
        Reason(
            "min_packets",
            f"policy {names}: offloads after more than {need} packets; seen so far: {seen}",
            {"policies": [p.name for p in matched], "min_packets": need, "packets": total},
        )
    ], tables


def _ct_state_reason(flow: Flow, ct: CtInfo) -> Reason | None:
    facts: list[str] = []
    tcp = flow.orig.proto == IPPROTO_TCP
    if tcp:
        if ct.tcp_state is not None and ct.tcp_state != "ESTABLISHED":
            facts.append(f"TCP state {ct.tcp_state}")
        if not flow.status & IPS_SEEN_REPLY:
            facts.append("no reply seen yet")
        if not flow.status & IPS_ASSURED:
            facts.append("not ASSURED")
    if ct.helper:
        facts.append(f"helper {ct.helper} attached")
    if flow.status & IPS_SEQ_ADJUST:
        facts.append("sequence adjustment")
    if flow.status & IPS_NAT_CLASH:
        facts.append("NAT clash")
    if not facts:
        return None
    rule = (
        "the kernel offloads TCP only once ESTABLISHED and ASSURED, and no flow with a"
        " helper, sequence adjustment or NAT clash"
    )
    return Reason(
        "ct_state",
        f"conntrack: {', '.join(facts)} ({rule})",
        {"tcp_state": ct.tcp_state, "status": flow.status, "helper": ct.helper},
    )


def _subject(flow: Flow) -> str:
    o = flow.orig
    proto = PROTO_NAMES.get(o.proto, str(o.proto))
    return f"{proto} {o.src}:{o.sport} -> {o.dst}:{o.dport} id={flow.id}"


def _classic_reason(world: World, direction: Direction, entering: Egress) -> Reason | None:
    l3 = world.topology.name(entering.devices[0])
    counter = classic_counter_of(l3, world.table.counters)
    packets = world.table.counters.get(counter, 0)
    if packets <= SUSPECT_PACKETS:
        return None
    return Reason(
        "classic_path",
        f"{direction} direction enters through {l3}, where {packets} packets of offloaded flows"
        f" took the classic path (counter {counter}; more than {SUSPECT_PACKETS} means that"
        " direction is not offloaded)",
        {"direction": direction, "ingress": l3, "counter": counter, "packets": packets},
    )


def explain_flow(world: World, flow: Flow, ct: CtInfo | None = None) -> Explanation:
    """Every reason ``flow`` is not on the fast path (none: it is)."""
    ct = ct or CtInfo()
    topo = world.topology
    offloaded = bool(flow.status & IPS_OFFLOAD)
    hw = bool(flow.status & IPS_HW_OFFLOAD)
    reasons: list[Reason] = []
    notes: list[str] = []

    def done() -> Explanation:
        fast = offloaded and not reasons
        return Explanation(_subject(flow), offloaded, hw, fast, tuple(reasons), tuple(notes))

    out_addr, back_addr = flow_egress_addresses(flow)
    out, back = egress(topo, out_addr), egress(topo, back_addr)
    if out.local or back.local:
        local = out_addr if out.local else back_addr
        reasons.append(
            Reason(
                "not_forwarded",
                f"{local} is this router's own address: the flow is not forwarded, and"
                " flowtables only offload forwarded flows",
                {"address": local},
            )
        )
        return done()
    if not out.devices or not back.devices:
        gone = out_addr if not out.devices else back_addr
        reasons.append(Reason("unroutable", f"no route to {gone}", {"address": gone}))
        return done()
    if not offloaded and not world.kernel[0]:
        reasons.append(
            Reason(
                "kernel",
                f"the kernel cannot offload: {world.kernel[1]}",
                {"probe": world.kernel[1]},
            )
        )
    if flow.orig.proto not in PROTO_NAMES:
        reasons.append(
            Reason(
                "protocol",
                f"protocol {flow.orig.proto}: the kernel offloads only TCP and UDP",
                {"proto": flow.orig.proto},
            )
        )
        return done()
    if not world.table.present or not world.table.flowtables:
        what = "the table is absent" if not world.table.present else "the table has no flowtable"
        reasons.append(Reason("no_table", f"{what}: nothing offloads", {}))
        return done()

    views = _views(flow, out, back, topo)
    tables: set[str] = set()
    if not offloaded:
        if world.policies is None:
            notes.append("policies not checked: no config (give --config, or run the agent)")
        else:
            found, tables = _policy_reasons(world.policies, flow, views, ct)
            reasons += found
        state = _ct_state_reason(flow, ct)
        if state is not None:
            reasons.append(state)
    # Packets of a direction enter through the other direction's egress chain.
    hooked_by = {
        name: devs for name, devs in world.table.flowtables.items() if not tables or name in tables
    }
    hooked = frozenset().union(*hooked_by.values()) if hooked_by else frozenset()
    sides: tuple[tuple[Direction, Egress], ...] = (("orig", back), ("reply", out))
    for direction, entering in sides:
        if not entering.complete:
            notes.append(
                f"{direction} direction: path not fully known (missing neighbour or FDB"
                " entry); its hook is not checked"
            )
            continue
        need, why = required_hooks(entering, topo)
        if not need & hooked:
            wanted = " or ".join(sorted(need))
            where = ", ".join(sorted(hooked_by)) or "any flowtable"
            reasons.append(
                Reason(
                    "device",
                    f"{direction} direction: {why}; {wanted} is not in {where}",
                    {
                        "direction": direction,
                        "needs": sorted(need),
                        "flowtables": sorted(hooked_by),
                    },
                )
            )
        elif offloaded and (found_classic := _classic_reason(world, direction, entering)):
            reasons.append(found_classic)
    if not offloaded and not reasons:
        notes.append(
            "every condition holds: the kernel offloads it with its next packet through the"
            " forward hook (an idle flow stays where it is)"
        )
    return done()


# --- devices ------------------------------------------------------------------


def explain_device(world: World, name: str, offloaded_through: int = 0) -> Explanation:
    """Whether traffic entering through device ``name`` can take the fast path.

    ``offloaded_through``: offloaded flows whose path uses the device (a fact
    for the notes)."""
    topo = world.topology
    idx = topo.ifindex(name)
    reasons: list[Reason] = []
    notes = [f"{offloaded_through} offloaded flow(s) use {name}"]
    if not world.kernel[0]:
        reasons.append(
            Reason(
                "kernel",
                f"the kernel cannot offload: {world.kernel[1]}",
                {"probe": world.kernel[1]},
            )
        )
    if idx is None:
        reasons.append(Reason("device", f"no device {name} in this namespace", {"device": name}))
        return Explanation(name, False, False, False, tuple(reasons), tuple(notes))
    if not world.table.present or not world.table.flowtables:
        what = "the table is absent" if not world.table.present else "the table has no flowtable"
        reasons.append(Reason("no_table", f"{what}: nothing offloads", {}))
        return Explanation(name, False, False, False, tuple(reasons), tuple(notes))
    link = topo.links[idx]
    hooked = world.table.hooked
    if link.kind == "bridge":
        ports = [topo.links[p] for p in topo.ports_of(idx)]
        for port in ports:
            need, why = _entry_hook(topo, port.ifindex)
            if need not in hooked:
                reasons.append(_unhooked(f"bridge port {port.name}: {why}", need))
        notes.append(f"{name} is a bridge: traffic enters through its ports")
        l3 = name
    else:
        need, why = _entry_hook(topo, idx)
        if need not in hooked and not (link.master is None and name in hooked):
            reasons.append(_unhooked(why, need))
        master = topo.links.get(link.master) if link.master is not None else None
        l3 = master.name if master is not None else name
    counter = classic_counter_of(l3, world.table.counters)
    packets = world.table.counters.get(counter, 0)
    notes.append(f"classic-path packets of offloaded flows entering via {l3}: {packets}")
    if packets > SUSPECT_PACKETS:
        reasons.append(
            Reason(
                "classic_path",
                f"{packets} packets of offloaded flows entering via {l3} took the classic path"
                f" (counter {counter})",
                {"ingress": l3, "counter": counter, "packets": packets},
            )
        )
    fast = not reasons
    return Explanation(name, False, False, fast, tuple(reasons), tuple(notes))


def _entry_hook(topo: Topology, ifindex: int) -> tuple[str, str]:
    """The device a flowtable must hook for traffic entering through ``ifindex``."""
    link = topo.links[ifindex]
    chain = [link.name]
    cur = link
    while cur.kind == "vlan" and cur.lower is not None and cur.lower in topo.links:
        cur = topo.links[cur.lower]
        chain.append(cur.name)
    if cur is link:
        return link.name, f"{link.name} must be hooked"
    in_bridge = link.master is not None
    role = "a VLAN bridge port" if in_bridge else "a VLAN device"
    return cur.name, f"{link.name} is {role}: the kernel hooks its real device {cur.name}"


def _unhooked(why: str, need: str) -> Reason:
    return Reason("device", f"{why}; {need} is not in any flowtable", {"needs": [need]})


# --- status -------------------------------------------------------------------


def status_verdict(
    kernel: tuple[bool | None, str],
    flowtables: Mapping[str, Iterable[str]],
    forwarded: int,
    offloaded: int,
    hw_offloaded: int,
    classic_by_input: Mapping[str, int],
) -> str:
    """The one line ``status`` opens with."""
    if kernel[0] is None:
        cap = "kernel capability unknown (not probed yet)"
    else:
        cap = "kernel can offload" if kernel[0] else f"kernel CANNOT offload ({kernel[1]})"
    fts = (
        "; ".join(
            f"flowtable {n} {{ {', '.join(sorted(d))} }}" for n, d in sorted(flowtables.items())
        )
        or "no flowtable"
    )
    hw = f" ({hw_offloaded} in hardware)" if hw_offloaded else ""
    flows = f"{offloaded} of {forwarded} forwarded flows offloaded{hw}"
    classic = ", ".join(f"{d} {p}" for d, p in sorted(classic_by_input.items())) or "none counted"
    return f"{cap}; {fts}; {flows}; classic-path packets of offloaded flows: {classic}"


def status_line(info: Mapping[str, Any]) -> str:
    """:func:`status_verdict` of a ``kernel/status.collect`` dictionary or of the
    agent's kernel view (same keys; flowtables as a list or a mapping)."""
    kernel = info.get("kernel") or {}
    report = classic_path_report(
        {name: (c["packets"], c["bytes"]) for name, c in info.get("counters", {}).items()}
    )
    classic = {r.ingress: r.packets for r in report if r.counter != CLASSIC_IN_OTHER or r.packets}
    flowtables = info.get("flowtables", {})
    if isinstance(flowtables, list):
        flowtables = {ft["name"]: ft["devices"] for ft in flowtables}
    return status_verdict(
        (kernel.get("can_offload"), str(kernel.get("reason", ""))),
        flowtables,
        int(info.get("forwarded_flows", 0)),
        int(info.get("forwarded_offloaded", 0)),
        int(info.get("hw_offloaded", 0)),
        classic,
    )

"""Config → the nftables ruleset of the owned table. Pure: no IO.

What the kernel must tell us first (which ports a bridge has today) comes in
as :class:`Facts`, gathered by the adapters before rendering.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from controlplane.config import Config, Flowtable, OffloadPolicy
from controlplane.core import nft

__all__ = ["CLASSIC_COUNTER", "Facts", "render"]

# Named counter of packets that took the classic forward path: the first thing
# to look at when asking "is the fast path working?".
CLASSIC_COUNTER = "classic_path"

FILTER_PRIO = 0
DSTNAT_PRIO = -100
SRCNAT_PRIO = 100


@dataclass(frozen=True)
class Facts:
    """Kernel state the rendering depends on."""

    bridge_ports: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def flowtable_devices(ft: Flowtable, facts: Facts) -> tuple[str, ...]:
    devices = set(ft.devices)
    for bridge in ft.bridges:
        devices.update(facts.bridge_ports.get(bridge, ()))
    return tuple(sorted(devices))


def _split(nets: list[IPv4Network | IPv6Network], version: int) -> list[IPv4Network | IPv6Network]:
    return [n for n in nets if n.version == version]


def _policy_rules(pol: OffloadPolicy) -> list[nft.Rule]:
    base: list[nft.Stmt] = [nft.match_l4proto(list(pol.protocols))]
    if pol.iifnames:
        base.append(nft.match_meta("iifname", pol.iifnames))
    if pol.oifnames:
        base.append(nft.match_meta("oifname", pol.oifnames))
    tail: list[nft.Stmt] = []
    if pol.min_packets:
        tail.append(nft.match_ct_packets_over(pol.min_packets))
    tail += [nft.counter(), nft.flow_add(pol.flowtable)]

    if not pol.saddr and not pol.daddr:
        return [nft.Rule("forward", (*base, *tail), f"policy {pol.name}")]
    rules = []
    for version in (4, 6):
        saddr, daddr = _split(pol.saddr, version), _split(pol.daddr, version)
        # A list that is set but has nothing of this family excludes the family.
        if (pol.saddr and not saddr) or (pol.daddr and not daddr):
            continue
        stmts = list(base)
        if saddr:
            stmts.append(nft.match_prefixes("saddr", saddr))  # type: ignore[arg-type]
        if daddr:
            stmts.append(nft.match_prefixes("daddr", daddr))  # type: ignore[arg-type]
        rules.append(nft.Rule("forward", (*stmts, *tail), f"policy {pol.name} ipv{version}"))
    return rules


def _nat_rules(cfg: Config) -> tuple[list[nft.Rule], list[nft.Rule], list[nft.Rule]]:
    pre: list[nft.Rule] = []
    post: list[nft.Rule] = []
    guard: list[nft.Rule] = []
    for d in cfg.nat.dnat:
        stmts = [
            nft.match_meta("iifname", [d.iifname]),
            nft.match_nfproto(d.to.version),
            nft.match_dport(d.protocol, d.port),
            nft.dnat(d.to, d.to_port),
        ]
        pre.append(nft.Rule("dstnat", tuple(stmts), f"dnat {d.iifname} {d.protocol} {d.port}"))
    for m in cfg.nat.masquerade:
        for version in (4, 6):
            saddr = _split(m.saddr, version)
            if m.saddr and not saddr:
                continue
            stmts = [nft.match_meta("oifname", [m.oifname]), nft.match_nfproto(version)]
            if saddr:
                stmts.append(nft.match_prefixes("saddr", saddr))  # type: ignore[arg-type]
            stmts.append(nft.masquerade())
            post.append(nft.Rule("srcnat", tuple(stmts), f"masquerade {m.oifname} ipv{version}"))
    for s in cfg.nat.snat:
        stmts = [nft.match_meta("oifname", [s.oifname]), nft.match_nfproto(s.to.version)]
        saddr = _split(s.saddr, s.to.version)
        if s.saddr and not saddr:
            continue
        if saddr:
            stmts.append(nft.match_prefixes("saddr", saddr))  # type: ignore[arg-type]
        stmts.append(nft.snat(s.to))
        post.append(nft.Rule("srcnat", tuple(stmts), f"snat {s.oifname}"))
    outside = cfg.nat.outside_interfaces()
    if cfg.nat.guard and outside:
        # After a NATed flow is torn down (device removed, cache invalidation),
        # a reply arriving first finds no conntrack entry, is taken as new
        # traffic for the router itself and answered with a RST that kills the
        # client's connection. Dropping new non-SYN TCP from outside lets the
        # next packet from inside re-create the entry instead.
        guard.append(
            nft.Rule(
                "input",
                (
                    nft.match_meta("iifname", outside),
                    nft.match_ct_state_new(),
                    nft.match_tcp_not_syn(),
                    nft.counter(),
                    nft.verdict("drop"),
                ),
                "nat guard: no RST for torn-down flows",
            )
        )
    return pre, post, guard


def render(cfg: Config, facts: Facts | None = None) -> nft.Ruleset:
    facts = facts or Facts()
    flowtables = tuple(
        nft.Flowtable(
            name=ft.name,
            priority=ft.priority,
            devices=flowtable_devices(ft, facts),
            hw_offload=ft.hw_offload,
            counter=ft.counter,
        )
        for ft in cfg.flowtables
    )
    chains: list[nft.Chain] = []
    rules: list[nft.Rule] = []
    counters: list[str] = []

    if cfg.flowtables or cfg.policies:
        counters.append(CLASSIC_COUNTER)
        chains.append(nft.Chain("forward", "filter", nft.Hook.FORWARD, FILTER_PRIO))
        rules.append(
            nft.Rule("forward", (nft.counter(CLASSIC_COUNTER),), "packets on the classic path")
        )
        for pol in cfg.policies:
            rules += _policy_rules(pol)

    pre, post, guard = _nat_rules(cfg)
    if guard:
        chains.append(nft.Chain("input", "filter", nft.Hook.INPUT, FILTER_PRIO))
        rules += guard
    if pre:
        chains.append(nft.Chain("dstnat", "nat", nft.Hook.PREROUTING, DSTNAT_PRIO))
        rules += pre
    if post:
        chains.append(nft.Chain("srcnat", "nat", nft.Hook.POSTROUTING, SRCNAT_PRIO))
        rules += post

    return nft.Ruleset(
        family=cfg.table.family,
        table=cfg.table.name,
        flowtables=flowtables,
        counters=tuple(counters),
        chains=tuple(chains),
        rules=tuple(rules),
    )

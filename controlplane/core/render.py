"""Config → the nftables ruleset of the owned table. Pure: no IO.

What the kernel must tell us first (which ports a bridge has today, which of
them are VLAN devices on which real device) comes in as :class:`Facts`,
gathered by the adapters (``kernel/rtnl/facts.py``) before rendering.

The forward chain, in order (order matters: ``flow add`` only acts on
established connections, so it must run before anything accepts them):

1. counters: every classic-path packet (``classic_path``) and, per flowtable
   device, packets of already-offloaded flows that still came in there
   (``classic_in_*``: the per-direction truth, see ``core/devices.py``);
2. offload policies (``flow add``);
3. with ``forward.policy: drop``: established/related, port forwards, the
   ``forward.accept`` entries; the rest meets the chain's drop policy.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network

from controlplane.config import Config, ForwardAccept, OffloadPolicy
from controlplane.core import nft
from controlplane.core.devices import (
    CLASSIC_IN_OTHER,
    DeviceSet,
    classic_counter_names,
    derive_all,
)
from controlplane.core.devices import (
    LinkFacts as Facts,
)

__all__ = ["CLASSIC_COUNTER", "Facts", "device_sets", "render"]

# Named counter of packets that took the classic forward path: the first thing
# to look at when asking "is the fast path working?".
CLASSIC_COUNTER = "classic_path"

FILTER_PRIO = 0
DSTNAT_PRIO = -100
SRCNAT_PRIO = 100


def device_sets(cfg: Config, facts: Facts | None = None) -> tuple[DeviceSet, ...]:
    """Each flowtable's derived devices with the reasons (what plan/render print)."""
    return derive_all(cfg, facts or Facts())


def _split(nets: list[IPv4Network | IPv6Network], version: int) -> list[IPv4Network | IPv6Network]:
    return [n for n in nets if n.version == version]


def _l4(
    protocols: list[str], dport: list[tuple[int, int]], sport: list[tuple[int, int]]
) -> list[nft.Stmt]:
    """Protocol and port matches, written the way nft lists them back: with ports
    and one protocol, ``tcp dport 80`` (it implies ``meta l4proto tcp``)."""
    out: list[nft.Stmt] = []
    ports = dport or sport
    if ports and len(protocols) == 1:
        proto = protocols[0]
    else:
        if protocols:
            out.append(nft.match_l4proto(protocols))
        proto = "th"
    if dport:
        out.append(nft.match_ports(proto, "dport", dport))
    if sport:
        out.append(nft.match_ports(proto, "sport", sport))
    return out


def _by_family(
    saddr: list[IPv4Network | IPv6Network], daddr: list[IPv4Network | IPv6Network]
) -> list[tuple[int | None, list[nft.Stmt]]]:
    """One entry per address family the prefixes allow (None: no prefix, any family)."""
    if not saddr and not daddr:
        return [(None, [])]
    out: list[tuple[int | None, list[nft.Stmt]]] = []
    for version in (4, 6):
        s, d = _split(saddr, version), _split(daddr, version)
        # A list that is set but has nothing of this family excludes the family.
        if (saddr and not s) or (daddr and not d):
            continue
        stmts = []
        if s:
            stmts.append(nft.match_prefixes("saddr", s))  # type: ignore[arg-type]
        if d:
            stmts.append(nft.match_prefixes("daddr", d))  # type: ignore[arg-type]
        out.append((version, stmts))
    return out


def _policy_rules(pol: OffloadPolicy) -> list[nft.Rule]:
    base: list[nft.Stmt] = []
    if pol.iifnames:
        base.append(nft.match_meta("iifname", pol.iifnames))
    if pol.oifnames:
        base.append(nft.match_meta("oifname", pol.oifnames))
    l4 = _l4(list(pol.protocols), pol.dport, pol.sport)
    if not pol.dport and not pol.sport:
        # Kept first, as before issue 9, so existing rules keep their tags.
        base.insert(0, l4.pop(0))
    tail: list[nft.Stmt] = []
    if pol.min_packets:
        tail.append(nft.match_ct_packets_over(pol.min_packets))
    tail += [nft.counter(), nft.flow_add(pol.flowtable)]
    rules = []
    for version, addrs in _by_family(pol.saddr, pol.daddr):
        label = f"policy {pol.name}" + (f" ipv{version}" if version else "")
        rules.append(nft.Rule("forward", (*base, *addrs, *l4, *tail), label))
    return rules


def _accept_rules(acc: ForwardAccept) -> list[nft.Rule]:
    base: list[nft.Stmt] = []
    if acc.iifnames:
        base.append(nft.match_meta("iifname", acc.iifnames))
    if acc.oifnames:
        base.append(nft.match_meta("oifname", acc.oifnames))
    # nft lists ICMPv6 by its /etc/protocols name.
    protocols = ["ipv6-icmp" if p == "icmpv6" else p for p in acc.protocols]
    l4 = _l4(protocols, acc.dport, acc.sport)
    rules = []
    for version, addrs in _by_family(acc.saddr, acc.daddr):
        label = f"accept {acc.name}" + (f" ipv{version}" if version else "")
        stmts = (*base, *addrs, *l4, nft.counter(), nft.verdict("accept"))
        rules.append(nft.Rule("forward", stmts, label))
    return rules


def _default_deny_rules(cfg: Config) -> list[nft.Rule]:
    """What a default-deny router accepts before its own list: the packets of
    connections it already accepted (and their ICMP errors: "fragmentation
    needed" must reach the sender or PMTU discovery breaks), and port forwards
    the config itself declares (a DNAT rule is an explicit wish to let it in)."""
    rules = [
        nft.Rule(
            "forward",
            (nft.match_ct_state(["established", "related"]), nft.verdict("accept")),
            "accept established",
        )
    ]
    if cfg.nat.dnat:
        rules.append(
            nft.Rule(
                "forward",
                (nft.match_ct_status("dnat"), nft.verdict("accept")),
                "accept port forwards",
            )
        )
    for acc in cfg.forward.accept:
        rules += _accept_rules(acc)
    return rules


def _classic_in_rules(sets: tuple[DeviceSet, ...], counters: list[str]) -> list[nft.Rule]:
    """Per input device, packets of already-offloaded flows that still reach the
    forward hook: where a direction is not offloaded (``core/devices.py``)."""
    per_ingress = classic_counter_names(l3 for ds in sets for l3, _ in ds.ingress)
    counters += sorted(per_ingress.values())
    counters.append(CLASSIC_IN_OTHER)
    rules = []
    label = "offloaded flows on the classic path"
    if per_ingress:
        stmts = (nft.match_ct_offloaded(), nft.counter_map("iifname", per_ingress))
        rules.append(nft.Rule("forward", stmts, f"{label}, by input device"))
    other = [nft.match_ct_offloaded()]
    if per_ingress:
        other.append(nft.match_meta_not("iifname", sorted(per_ingress)))
    rules.append(nft.Rule("forward", (*other, nft.counter(CLASSIC_IN_OTHER)), f"{label}, others"))
    return rules


def _dnat_rules(cfg: Config) -> list[nft.Rule]:
    pre: list[nft.Rule] = []
    for d in cfg.nat.dnat:
        stmts = []
        if d.iifname is not None:
            stmts.append(nft.match_meta("iifname", [d.iifname]))
        stmts.append(nft.match_nfproto(d.to.version))
        if d.daddr is not None:
            stmts.append(nft.match_prefixes("daddr", [ip_network(d.daddr)]))  # type: ignore[arg-type]
        stmts += [nft.match_dport(d.protocol, d.port), nft.dnat(d.to, d.to_port)]
        # "dnat [IIF] [DADDR] PROTO PORT" (built without a generator: once per rule)
        where = d.iifname or ""
        if d.daddr:
            where = f"{where} {d.daddr}" if where else str(d.daddr)
        pre.append(nft.Rule("dstnat", tuple(stmts), f"dnat {where} {d.protocol} {d.port}"))
    return pre


def _nat_rules(cfg: Config) -> tuple[list[nft.Rule], list[nft.Rule], list[nft.Rule]]:
    pre = _dnat_rules(cfg)
    post: list[nft.Rule] = []
    guard: list[nft.Rule] = []
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
        # INVALID too: a reply conntrack's TCP tracker finds out of window (a
        # re-created entry whose window scaling was unknown; kube-proxy drops
        # INVALID for the same reason) skips de-NAT, is addressed to the
        # router's own masquerade address and would be answered with a RST
        # just the same; dropped, it is retransmitted instead.
        guard.append(
            nft.Rule(
                "input",
                (
                    nft.match_meta("iifname", outside),
                    nft.match_ct_state(["invalid", "new"]),
                    nft.match_tcp_not_syn(),
                    nft.counter(),
                    nft.verdict("drop"),
                ),
                "nat guard: no RST for torn-down flows",
            )
        )
    return pre, post, guard


def render(cfg: Config, facts: Facts | None = None) -> nft.Ruleset:
    sets = device_sets(cfg, facts)
    flowtables = tuple(
        nft.Flowtable(
            name=ft.name,
            priority=ft.priority,
            devices=ds.names,
            hw_offload=ft.hw_offload,
            counter=ft.counter,
        )
        for ft, ds in zip(cfg.flowtables, sets, strict=True)
    )
    chains: list[nft.Chain] = []
    rules: list[nft.Rule] = []
    counters: list[str] = []

    deny = cfg.forward.policy == "drop"
    if cfg.flowtables or cfg.policies or deny:
        counters.append(CLASSIC_COUNTER)
        chains.append(
            nft.Chain("forward", "filter", nft.Hook.FORWARD, FILTER_PRIO, cfg.forward.policy)
        )
        rules.append(
            nft.Rule("forward", (nft.counter(CLASSIC_COUNTER),), "packets on the classic path")
        )
        if cfg.flowtables:
            rules += _classic_in_rules(sets, counters)
        for pol in cfg.policies:
            rules += _policy_rules(pol)
        if deny:
            rules += _default_deny_rules(cfg)

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

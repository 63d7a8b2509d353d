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
from controlplane.core import matches, nft
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


def _entry_rules(
    entry: OffloadPolicy | ForwardAccept, label: str, tail: tuple[nft.Stmt, ...]
) -> list[nft.Rule]:
    """One rule per IP family the entry's prefixes allow: its matches (the
    table in core/matches.py), then ``tail``."""
    return [
        nft.Rule("forward", (*stmts, *tail), label + (f" ipv{version}" if version else ""))
        for version, stmts in matches.rules(entry)
    ]


def _policy_rules(pol: OffloadPolicy) -> list[nft.Rule]:
    return _entry_rules(pol, f"policy {pol.name}", (nft.counter(), nft.flow_add(pol.flowtable)))


def _accept_rules(acc: ForwardAccept) -> list[nft.Rule]:
    return _entry_rules(acc, f"accept {acc.name}", (nft.counter(), nft.verdict("accept")))


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

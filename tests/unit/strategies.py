"""Hypothesis strategies: random configs that are valid by construction.

They reach every part of the config the renderer reads: flowtables with
devices and bridges, policies with interfaces, both address lists in one or
two families and ports, masquerade/SNAT/DNAT (by interface and by address),
the NAT guard on and off, VLAN stacks (QinQ) and a default-deny forward
section. ``tests/unit/test_config.py`` checks that each is generated.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from controlplane.config import NFT_KEYWORDS

_alpha = "abcdefghijklmnopqrstuvwxyz"
names = st.text(_alpha, min_size=2, max_size=8).filter(lambda s: s not in NFT_KEYWORDS)
ifnames = st.text(_alpha + "0123456789.-_", min_size=1, max_size=15).filter(
    lambda s: s not in (".", "..")
)
# Distinct /16s and /64s never nest, so any unique list of them is valid.
v4nets = st.builds(lambda a, n: f"10.{a}.0.0/{n}", st.integers(0, 255), st.integers(16, 16))
v6nets = st.builds(lambda a: f"fd00:{a:x}::/64", st.integers(0, 0xFFFF))
v4addrs = st.builds(lambda a, b: f"192.0.{a}.{b}", st.integers(0, 255), st.integers(1, 254))
v6addrs = st.builds(lambda a: f"2001:db8::{a:x}", st.integers(1, 0xFFFF))
_NETS = {4: v4nets, 6: v6nets}
_ADDRS = {4: v4addrs, 6: v6addrs}
families = st.sampled_from([(4,), (6,), (4, 6)])


@st.composite
def prefixes(draw: st.DrawFn, fams: tuple[int, ...]) -> list[str]:
    """A unique prefix list holding every family of ``fams`` and no other."""
    out: list[str] = []
    for fam in fams:
        out += draw(st.lists(_NETS[fam], min_size=1, max_size=2, unique=True))
    return draw(st.permutations(out))


@st.composite
def address_lists(draw: st.DrawFn) -> dict[str, list[str]]:
    """saddr and/or daddr whose families agree (a rule per family, none dropped)."""
    fams = draw(families)
    out: dict[str, list[str]] = {}
    for key in draw(st.sampled_from([(), ("saddr",), ("daddr",), ("saddr", "daddr")])):
        out[key] = draw(prefixes(fams))
    return out


# even ports: never adjacent, which nft would merge in a list with a range
ports = st.lists(st.integers(1, 499).map(lambda p: 2 * p), min_size=1, max_size=3, unique=True)


@st.composite
def port_lists(draw: st.DrawFn) -> list[int | str]:
    # single ports below 1000 and at most one range above: never overlapping or touching
    out: list[int | str] = list(draw(ports))
    if draw(st.booleans()):
        low = draw(st.integers(1001, 60000))
        out.append(f"{low}-{low + draw(st.integers(1, 5000))}")
    return out


@st.composite
def vlans(draw: st.DrawFn, parents: list[str]) -> list[dict[str, Any]]:
    """0-3 VLAN devices on ``parents``, some stacked (QinQ, two tags at most)."""
    out: list[dict[str, Any]] = []
    used: set[str] = set(parents)
    keys: set[tuple[str, str, int]] = set()
    for _ in range(draw(st.integers(0, 3))):
        singles = [v["name"] for v in out if v["parent"] not in {w["name"] for w in out}]
        parent = draw(st.sampled_from(parents + singles))
        vid = draw(st.integers(1, 4094))
        proto = draw(st.sampled_from(["802.1q", "802.1ad"]))
        name = f"{parent[:10]}.{vid}"[:15]
        if name in used or (parent, proto, vid) in keys:
            continue
        used.add(name)
        keys.add((parent, proto, vid))
        out.append({"name": name, "parent": parent, "id": vid, "protocol": proto})
    return out


@st.composite
def nat_sections(draw: st.DrawFn) -> dict[str, Any]:
    nat: dict[str, Any] = {}
    if draw(st.booleans()):
        masq: list[dict[str, Any]] = []
        for oif in draw(st.lists(ifnames, min_size=1, max_size=2, unique=True)):
            m: dict[str, Any] = {"oifname": oif}
            if draw(st.booleans()):
                m["saddr"] = draw(prefixes(draw(families)))
            masq.append(m)
        nat["masquerade"] = masq
    if draw(st.booleans()):
        snat: list[dict[str, Any]] = []
        for oif in draw(st.lists(ifnames, min_size=1, max_size=2, unique=True)):
            fam = draw(st.sampled_from([4, 6]))
            s: dict[str, Any] = {"oifname": oif, "to": draw(_ADDRS[fam])}
            if draw(st.booleans()):
                s["saddr"] = draw(prefixes((fam,)))
            snat.append(s)
        nat["snat"] = snat
    if draw(st.booleans()):
        dnat: list[dict[str, Any]] = []
        for p in draw(st.lists(st.integers(1, 65535), min_size=1, max_size=3, unique=True)):
            fam = draw(st.sampled_from([4, 6]))
            d: dict[str, Any] = {"port": p, "to": draw(_ADDRS[fam])}
            d["protocol"] = draw(st.sampled_from(["tcp", "udp"]))
            match = draw(st.sampled_from(["iifname", "daddr", "both"]))
            if match in ("iifname", "both"):
                d["iifname"] = "wan0"
            if match in ("daddr", "both"):
                d["daddr"] = draw(_ADDRS[fam])
            if draw(st.booleans()):
                d["to_port"] = draw(st.integers(1, 65535))
            dnat.append(d)
        nat["dnat"] = dnat
    if draw(st.booleans()):
        nat["guard"] = draw(st.booleans())
    return nat


@st.composite
def forward_sections(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {}
    accept: list[dict[str, Any]] = []
    for name in draw(st.lists(names, max_size=2, unique=True)):
        acc: dict[str, Any] = {"name": name, **draw(address_lists())}
        if draw(st.booleans()):
            acc["protocols"] = draw(st.sampled_from([["tcp"], ["udp"], ["tcp", "udp"]]))
            if draw(st.booleans()):
                acc["dport"] = draw(port_lists())
        if draw(st.booleans()):
            acc["oifnames"] = draw(st.lists(ifnames, min_size=1, max_size=2, unique=True))
        accept.append(acc)
    return {"policy": "drop", "accept": accept}


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    ft_names = draw(st.lists(names, min_size=0, max_size=3, unique=True))
    all_devs = draw(st.lists(ifnames, min_size=len(ft_names), max_size=12, unique=True))
    bridges = [f"br{i}" for i in range(draw(st.integers(0, 2)))]
    all_devs = [d for d in all_devs if d not in bridges]
    flowtables = []
    for i, name in enumerate(ft_names):
        devs = all_devs[i :: len(ft_names)]
        ft: dict[str, Any] = {
            "name": name,
            "priority": draw(st.integers(-200, 200)),
            "devices": devs,
            "hw_offload": draw(st.booleans()),
            "counter": draw(st.booleans()),
        }
        # each bridge in at most one flowtable, like each device
        mine = [b for j, b in enumerate(bridges) if j % len(ft_names) == i]
        with_bridges: bool = draw(st.booleans())
        if mine and with_bridges:
            ft["bridges"] = mine
        if not ft["devices"] and not ft.get("bridges"):
            ft["devices"] = [f"eth{i}"]
        flowtables.append(ft)
    policies = []
    if ft_names:
        for pname in draw(st.lists(names, max_size=4, unique=True)):
            pol: dict[str, Any] = {"name": pname, "flowtable": draw(st.sampled_from(ft_names))}
            pol["protocols"] = draw(st.sampled_from([["tcp"], ["udp"], ["tcp", "udp"]]))
            if draw(st.booleans()):
                pol["iifnames"] = draw(st.lists(ifnames, min_size=1, max_size=3, unique=True))
            if draw(st.booleans()):
                pol["oifnames"] = draw(st.lists(ifnames, min_size=1, max_size=3, unique=True))
            pol.update(draw(address_lists()))
            if draw(st.booleans()):
                pol[draw(st.sampled_from(["dport", "sport"]))] = draw(port_lists())
            if draw(st.booleans()):
                pol["min_packets"] = draw(st.integers(1, 1000))
            policies.append(pol)
    out: dict[str, Any] = {
        "version": 1,
        "flowtables": flowtables,
        "policies": policies,
        "nat": draw(nat_sections()),
        "vlans": draw(vlans(all_devs or ["eth0"])),
    }
    forward = draw(forward_sections())
    if forward:
        out["forward"] = forward
    return out

"""Hypothesis strategies: random configs that are valid by construction."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from controlplane.config import NFT_KEYWORDS

_alpha = "abcdefghijklmnopqrstuvwxyz"
names = st.text(_alpha, min_size=2, max_size=8).filter(lambda s: s not in NFT_KEYWORDS)
ifnames = st.text(_alpha + "0123456789.-_", min_size=1, max_size=15).filter(
    lambda s: s not in (".", "..")
)
v4nets = st.builds(lambda a, n: f"10.{a}.0.0/{n}", st.integers(0, 255), st.integers(16, 16))
v6nets = st.builds(lambda a: f"fd00:{a:x}::/64", st.integers(0, 0xFFFF))


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    ft_names = draw(st.lists(names, min_size=0, max_size=3, unique=True))
    all_devs = draw(st.lists(ifnames, min_size=len(ft_names), max_size=12, unique=True))
    flowtables = []
    for i, name in enumerate(ft_names):
        devs = all_devs[i :: len(ft_names)] if ft_names else []
        flowtables.append(
            {
                "name": name,
                "priority": draw(st.integers(-200, 200)),
                "devices": devs,
                "hw_offload": draw(st.booleans()),
                "counter": draw(st.booleans()),
            }
        )
    policies = []
    if ft_names:
        for pname in draw(st.lists(names, max_size=4, unique=True)):
            pol: dict[str, Any] = {"name": pname, "flowtable": draw(st.sampled_from(ft_names))}
            pol["protocols"] = draw(st.sampled_from([["tcp"], ["udp"], ["tcp", "udp"]]))
            if draw(st.booleans()):
                pol["iifnames"] = draw(st.lists(ifnames, min_size=1, max_size=3, unique=True))
            if draw(st.booleans()):
                pol["saddr"] = draw(
                    st.lists(st.one_of(v4nets, v6nets), min_size=1, max_size=3, unique=True)
                )
            if draw(st.booleans()):
                pol["min_packets"] = draw(st.integers(1, 1000))
            policies.append(pol)
    nat: dict[str, Any] = {}
    if draw(st.booleans()):
        nat["masquerade"] = [{"oifname": draw(ifnames)}]
    if draw(st.booleans()):
        nat["dnat"] = [
            {"iifname": "wan0", "port": p, "to": f"10.0.0.{(p % 250) + 1}", "to_port": 80}
            for p in draw(st.lists(st.integers(1, 65535), max_size=3, unique=True))
        ]
    return {"version": 1, "flowtables": flowtables, "policies": policies, "nat": nat}

"""The conntrack entries of a few addresses through kernel-filtered dumps
(``kernel/ctnetlink/lookup.py``), against the real host kernel."""

from __future__ import annotations

import pytest

from controlplane.core.flowpath import IPS_DST_NAT, CtTuple, Family, Flow
from controlplane.kernel.ctnetlink import lookup
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket, decode_entry


def tcp(src: str, dst: str, sport: int, dport: int = 80, *, zone: int = 0) -> Flow:
    family = Family.IPV6 if ":" in src else Family.IPV4
    return Flow(
        CtTuple(family, 6, src, dst, sport, dport),
        CtTuple(family, 6, dst, src, dport, sport),
        zone=zone,
    )


def key(f: Flow) -> tuple[int, str, str, int]:
    return (f.zone, f.orig.src, f.orig.dst, f.orig.sport)


def test_entries_of_finds_orig_and_reply_sources_only(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = "10.0.1.5"
    # A port forward to HOST: its original tuple never names it, its reply does.
    forwarded = Flow(
        CtTuple(Family.IPV4, 6, "198.51.100.7", "203.0.113.1", 4000, 80),
        CtTuple(Family.IPV4, 6, host, "198.51.100.7", 8080, 4000),
        status=IPS_DST_NAT,
    )
    mine = [tcp(host, "192.0.2.2", 1000), tcp(host, "192.0.2.2", 1001, zone=3), forwarded]
    others = [tcp("10.0.1.6", "192.0.2.2", 1000 + i) for i in range(300)]
    others.append(tcp("192.0.2.9", "10.0.1.50", 1000))  # HOST's neighbour, not HOST
    v6 = [tcp("2001:db8::5", "2001:db8:1::2", 1000), tcp("2001:db8::6", "2001:db8:1::2", 1000)]
    with ConntrackSocket(netns) as ct:
        created, _ = ct.create((f, 600) for f in [*mine, *others, *v6])
    assert created == len(mine) + len(others) + len(v6)

    decoded: list[int] = []

    def counting(buf: bytes, start: int, end: int) -> Flow | None:
        decoded.append(1)
        return decode_entry(buf, start, end)

    with monkeypatch.context() as m:
        m.setattr(lookup, "decode_entry", counting)
        got = lookup.entries_of([host], netns)
    assert sorted(map(key, got)) == sorted(map(key, mine))
    # The kernel filtered: it sent HOST's entries (each of its two dumps), not the table.
    assert len(decoded) <= 2 * len(mine), len(decoded)

    got6 = lookup.entries_of(["2001:db8:0::5"], netns)  # any spelling of the address
    assert sorted(map(key, got6)) == [key(v6[0])]
    assert lookup.entries_of([], netns) == []
    both = lookup.entries_of([host, "2001:db8::5"], netns)
    assert sorted(map(key, both)) == sorted(map(key, [*mine, v6[0]]))

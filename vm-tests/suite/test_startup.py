"""Start-up without a blind window (issue 16, item 6): a MAC move that happens while
``offloadctl watch`` is still in its start-up dump is repaired like any other move.

The topology of ``test_invalidation.py`` (``topology.SwitchedTopology``: host A behind a
switch re-cabled between ports p1/p2 of the router's br0; B on the WAN side) with an
offloaded TCP stream from B to A, plus ``FILLER`` conntrack entries of other hosts (routed,
made with batched CT_NEW): under TCG their dump takes tens of seconds. The watcher is
started, and as soon as it has subscribed and taken its topology snapshot (its ``Snapshot``
line, written before the conntrack dump starts), A moves to the other port and announces
itself. The stream's flowtable entry still caches the old port: until it is torn down,
B's traffic goes to the port A left.

Asserted, from the watcher's own timestamps (``ts`` of its JSON lines, one clock):

- the move happened before the dump ended (else the scenario tested nothing: more
  FILLER);
- the stream's entry was torn down for that move *before* the dump ended (the old
  watcher read events only after it: the stall lasted the whole dump);
- the stream then goes on, byte-exact in both directions, no reset.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from topology import (
    NS2,
    NSA,
    NSR,
    ProjectRuleset,
    TcpDuplex,
    WatchProcess,
    announce,
    build_switched,
    fdb_port,
    find_conntrack,
    wait_for,
)

from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket

FILLER = 60_000  # other hosts' entries: a start-up dump of tens of seconds under TCG
FILLER_HOSTS = 200
FILLER_TIMEOUT = 3600
CT_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"  # global: 65,536 in a 1 GiB VM


def filler_flows() -> list[tuple[Flow, int]]:
    """Established TCP entries of FILLER_HOSTS hosts on C's routed subnet toward B."""
    per = FILLER // FILLER_HOSTS
    out = []
    for h in range(FILLER_HOSTS):
        src = f"10.0.3.{h + 3}"
        for j in range(per):
            sport = 20_000 + j
            orig = CtTuple(Family.IPV4, 6, src, "10.0.2.2", sport, 80)
            reply = CtTuple(Family.IPV4, 6, "10.0.2.2", src, 80, sport)
            out.append((Flow(orig, reply), FILLER_TIMEOUT))
    return out


def stamp(rec: dict[str, Any]) -> float:
    """The watcher's own wall clock of a line (RFC 3339 ``ts``)."""
    return datetime.fromisoformat(str(rec["ts"]).replace("Z", "+00:00")).timestamp()


def first(w: WatchProcess, pred: Any) -> dict[str, Any] | None:
    return next((rec for _, rec in list(w.lines) if pred(rec)), None)


def test_move_during_startup_dump_is_repaired() -> None:
    topo = build_switched()
    w: WatchProcess | None = None
    try:
        ProjectRuleset(NSR, {"devices": ["wan0", "lanc"], "bridges": ["br0"]}, "wan0").use(
            nat=False
        )
        d = TcpDuplex(NSA, NS2, topo.b_ip).start()
        d.wait_bulk(64 * 1024, timeout=60)
        wait_for(
            lambda: any(e.offloaded for e in find_conntrack(NSR, sport=d.client[1])),
            timeout=30,
            what="the stream's [OFFLOAD]",
        )
        with open(CT_MAX) as f:
            if int(f.read()) < 2 * FILLER:
                with open(CT_MAX, "w") as out:
                    out.write(str(2 * FILLER))
        with ConntrackSocket(NSR) as ct:
            created, _ = ct.create(filler_flows())
        assert created == FILLER, created
        mac = topo.a_mac()

        w = WatchProcess(NSR)
        wait_for(
            lambda: first(w, lambda r: r.get("event") == "Snapshot"),
            timeout=300,
            interval=0.05,
            what="the watcher's topology snapshot (subscribed, dump about to start)",
        )
        new_port = topo.move()
        announce(NSA, "eth0", topo.a_ip, mac)
        wait_for(lambda: fdb_port(NSR, "br0", mac) == new_port, timeout=10, what="A learned")
        moved = time.time()

        def repaired(r: dict[str, Any]) -> bool:
            causes = " ".join(r.get("causes", []))
            return r.get("decision") == "tore down" and mac in causes and "moved" in causes

        torn = wait_for(lambda: first(w, repaired), timeout=600, what="the move's teardown")
        dumped = wait_for(
            lambda: first(w, lambda r: r.get("event") == "FlowsDumped"),
            timeout=600,
            what="the end of the start-up dump",
        )
        print(
            f"move {moved - stamp(dumped):+.1f} s from the dump's end; torn down"
            f" {stamp(torn) - moved:.2f} s after the move, dump ended"
            f" {stamp(dumped) - moved:.2f} s after it ({dumped.get('flows')} flows)"
        )
        assert moved < stamp(dumped), "the dump ended before the move: raise FILLER"
        assert stamp(torn) < stamp(dumped), (
            f"the move was repaired only after the start-up dump ({torn}, {dumped})"
        )
        d.wait_bulk(d.bulk_received + 64 * 1024, timeout=120)
        bulk, beat = d.stop(timeout=120)
        assert bulk.intact, bulk
        assert beat.intact, beat
    finally:
        if w is not None:
            w.stop()
        topo.teardown()

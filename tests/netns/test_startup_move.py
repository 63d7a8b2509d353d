"""A MAC move queued while the invalidation service is in its start-up dump is acted
on during the dump, not after it (issue 16, item 6), against the real host kernel.

Router namespace: bridge br0 with ports p1, p2; client C (permanent neighbour entry,
static FDB entry on p1) with 50 TCP entries toward a server behind ``wan``, plus
FILLER entries of other hosts. The host has no flowtables: the service runs with the
test-only switch (every entry counts as offloaded). The move (C's MAC to p2) is made
from the service's own report of its topology snapshot, the last thing before the
dump: the event is queued when the dump starts, deterministically. The VM suite
proves the same with a real flowtable and a real stream (``test_startup.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controlplane.config import InvalidationConfig
from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.service.invalidation import InvalidationService
from tests.netns.conftest import sh

CLIENT, CLIENT_MAC, SERVER = "10.1.0.2", "02:c0:00:00:00:02", "192.0.2.2"
FILLER = 3000


def tcp(src: str, sport: int) -> Flow:
    return Flow(
        CtTuple(Family.IPV4, 6, src, SERVER, sport, 80),
        CtTuple(Family.IPV4, 6, SERVER, src, 80, sport),
    )


def lab(netns: str) -> None:
    batch = [
        "link add br0 type bridge",
        "link add p1 type veth peer name q1",
        "link add p2 type veth peer name q2",
        "link set p1 master br0 up",
        "link set p2 master br0 up",
        "link set q1 up",
        "link set q2 up",
        "link set br0 up",
        "link add wan type veth peer name wanpeer",
        "link set wan up",
        "link set wanpeer up",
        "addr add 10.1.0.1/16 dev br0",
        "addr add 192.0.2.1/24 dev wan",
        f"neigh add {SERVER} lladdr 02:ee:00:00:00:02 dev wan nud permanent",
        f"neigh add {CLIENT} lladdr {CLIENT_MAC} dev br0 nud permanent",
    ]
    sh("ip", "-batch", "-", netns=netns, input="\n".join(batch) + "\n")
    sh("bridge", "fdb", "add", CLIENT_MAC, "dev", "p1", "master", "static", netns=netns)
    filler = [tcp(f"10.1.{1 + i // 200}.{2 + i % 200}", 1000 + i) for i in range(FILLER)]
    with ConntrackSocket(netns) as ct:
        created, _ = ct.create(
            (f, 3600) for f in [*filler, *(tcp(CLIENT, 5000 + j) for j in range(50))]
        )
    assert created == FILLER + 50


def test_move_queued_during_the_start_up_dump_is_repaired_before_it_ends(
    make_netns: Callable[[], str],
) -> None:
    netns = make_netns()
    lab(netns)
    records: list[dict[str, Any]] = []

    def report(record: dict[str, Any]) -> None:
        records.append(record)
        if record.get("event") == "Snapshot":  # subscribed; the dump starts next
            sh("bridge", "fdb", "replace", CLIENT_MAC, "dev", "p2", "master", "static",
               netns=netns)  # fmt: skip

    service = InvalidationService(
        netns,
        InvalidationConfig(reconcile_seconds=0, prune_seconds=0),
        only_offloaded=False,
        report=report,
    )
    service.start()
    try:
        while service.step(timeout=0.2):  # what is still queued: the old loop's repair
            pass
    finally:
        service.stop()
    kinds = [r.get("event") or r.get("decision") for r in records]
    dumped = kinds.index("FlowsDumped")
    torn = [r for r in records if r.get("decision") == "tore down"]
    assert len(torn) == 1 and torn[0]["deleted"] == 50, torn
    assert "moved p1 -> p2" in " ".join(torn[0]["causes"]), torn
    assert kinds.index("tore down") < dumped, kinds
    assert records[dumped]["flows"] == FILLER + 50

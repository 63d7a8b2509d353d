"""A next-hop change on a bridge path, mid-stream (issue 20), with ``offloadctl watch``.

``topology.NextHopTopology``: A behind br0, next hops N1 (br1) and N2 (br2), B behind
both; the flowtable from ``bridges: [br0, br1, br2]``. Two TCP connections B -> A, as
iperf3 makes them: a "data" one carrying a verified stream (B sends, or A sends: both
directions) and a nearly idle "control" one. Mid-stream the router's route to B's prefix
moves from N1 to N2, B's default route moves to N2, and N1 stops forwarding. N2 has never
talked to the router: its neighbour entry is unresolved when the route moves, which is
the event order that broke (the engine tore the flows down, the kernel re-offloaded them
before N2's neighbour entry was valid, and IPv4 cached a path that never delivers).

Asserted for v4 and v6, both stream directions, routed and with masquerade:

- the data stream makes progress again within ``RESUME_LIMIT`` (1 s) of the change, and
  both connections end byte-exact, with EOF on both sides and no RST seen in the router;
- every entry the watcher deleted was re-created, by the watcher or (EEXIST) by a packet
  that reached conntrack first (``tore down`` lines: ``deleted = recreated +
  created_by_traffic``), and the lines say why each teardown happened;
- no flow is left offloaded on a path whose next hop's neighbour entry was not valid when
  the kernel cached it: once repaired, the data connection is ``[OFFLOAD]`` and, while
  it moves ``CHECK_BYTES``, the forward hook sees at most ``CLASSIC_MAX`` TCP packets from
  either side (a path cached before N2 was resolved keeps B's side on the classic path:
  its cached input device is the bridge, not the port; IPv4's "on link" path delivers
  nothing at all).

``VMTEST_REPEAT=N`` runs every case N times in one boot; ``VMTEST_CPU_HOG=1`` keeps one
busy-looping process running in the guest during each case, ``VMTEST_CPU_HOG=both`` runs
every case idle and with it (``make vm-stress`` does both).
``VMTEST_TRACE_DIR``: write, per case, the router's conntrack events (``conntrack -E``),
neighbours and conntrack table around the change, and the watcher's lines (evidence).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from topology import (
    NSA,
    NSB,
    NSR,
    NextHopTopology,
    ProjectRuleset,
    ResetSniffer,
    TcpDuplex,
    WatchProcess,
    add_observer,
    build_nexthop,
    find_conntrack,
    kernel_state,
    ns_run,
    observer_counter,
    reset_counter,
    run,
    running_watch,
    wait_for,
)

RESUME_LIMIT = 1.0  # seconds: longest stall of the data stream after the change
RATE = 100 * 1024  # data stream, bytes/s
AFTER_CHANGE = RATE  # bytes the data stream must move after the change
CHECK_BYTES = 32 * 1024  # bytes moved while the forward hook counts classic-path packets
CLASSIC_MAX = 8  # packets from either side allowed through the forward hook meanwhile
REPEAT = int(os.environ.get("VMTEST_REPEAT", "1"))
TRACE_DIR = os.environ.get("VMTEST_TRACE_DIR", "")
HOG = os.environ.get("VMTEST_CPU_HOG", "")
HOGS = [False, True] if HOG == "both" else [bool(HOG)]
CASES = [
    (v, bulk, nat, hog)
    for hog in HOGS
    for v in (4, 6)
    for bulk in ("client", "server")
    for nat in (False, True)
]
Case = tuple[int, str, bool, bool]


def _case_id(case: Case) -> str:
    v, bulk, nat, hog = case
    who = "b_sends" if bulk == "client" else "a_sends"
    return f"v{v}-{who}-{'masq' if nat else 'routed'}" + ("-hog" if hog else "")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        cases = [(c, r) for r in range(REPEAT) for c in CASES]
        ids = [_case_id(c) + (f"-rep{r}" if REPEAT > 1 else "") for c, r in cases]
        metafunc.parametrize("case", [c for c, _ in cases], ids=ids)


class Net:
    def __init__(self, topo: NextHopTopology) -> None:
        self.topo = topo
        # With masquerade, B's connections reach A from the router's address: a reply
        # from A that finds no entry is addressed to the router itself (the RST case).
        flowtable = {"bridges": ["br0", "br1", "br2"]}
        self.ruleset = ProjectRuleset(NSR, flowtable, masquerade="br0").use


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    topo = build_nexthop()
    add_observer(NSR, counter="from_a", match='meta l4proto tcp iifname "br0"')
    add_observer(NSR, counter="from_b", match='meta l4proto tcp iifname { "br1", "br2" }')
    yield Net(topo)
    topo.teardown()


@contextmanager
def cpu_hog(on: bool) -> Iterator[None]:
    """One busy-looping process in the guest (2 vCPUs) for the block."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(10)


@pytest.fixture(scope="module")
def watcher(net: Net) -> Iterator[WatchProcess]:
    with running_watch(NSR) as w:
        yield w


class Progress:
    """(time.time(), bytes) of the data stream every 20 ms, in a thread."""

    def __init__(self, d: TcpDuplex) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(d,), daemon=True)
        self._thread.start()

    def _run(self, d: TcpDuplex) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.time(), d.bulk_received))

    def longest_stall(self, since: float, starting_before: float) -> tuple[float, float]:
        """(seconds, start) of the longest interval without progress that starts after
        SINCE and before STARTING_BEFORE."""
        best, start = 0.0, since
        last_t, last_b = since, next((b for t, b in self.samples if t >= since), 0)
        for t, b in self.samples:
            if t < since:
                continue
            if b != last_b:
                last_t, last_b = t, b
            elif t - last_t > best and last_t < starting_before:
                best, start = t - last_t, last_t
        return best, start

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Trace:
    """Evidence for one case (``VMTEST_TRACE_DIR``): conntrack events and snapshots."""

    def __init__(self, name: str) -> None:
        self.path = Path(TRACE_DIR) / f"{name}.txt" if TRACE_DIR else None
        self.parts: list[str] = []
        self.events = None
        if self.path is not None:
            self.events = subprocess.Popen(
                ["ip", "netns", "exec", NSR, "conntrack", "-E", "-o", "id,timestamp"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

    def snap(self, title: str) -> None:
        if self.path is None:
            return
        neigh = run("ip", "-n", NSR, "neigh", check=False)
        ct = ns_run(NSR, "conntrack", "-L", "-o", "id", check=False)
        ct6 = ns_run(NSR, "conntrack", "-L", "-f", "ipv6", "-o", "id", check=False)
        self.parts.append(f"=== {time.time():.3f} {title}\n{neigh}{ct}{ct6}")

    def close(self, w: WatchProcess, since: float) -> None:
        if self.path is None or self.events is None:
            return
        self.events.terminate()
        out, _ = self.events.communicate(timeout=10)
        lines = [f"{ts:.3f} {rec}" for ts, rec in w.since(since)]
        text = "\n".join([*self.parts, "=== conntrack -E", out, "=== watcher", *lines])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text + "\n")


def entry_of(d: TcpDuplex, v: int) -> Any:
    found = find_conntrack(NSR, sport=d.client[1], dport=d.server[1], family=v)  # type: ignore[arg-type]
    if not found:  # picked up mid-stream from A's side (no NAT): tuple reversed
        found = find_conntrack(NSR, sport=d.server[1], dport=d.client[1], family=v)  # type: ignore[arg-type]
    return found[0] if len(found) == 1 else None


def offloaded(d: TcpDuplex, v: int) -> Any:
    e = entry_of(d, v)
    return e if e is not None and e.offloaded else None


def test_next_hop_moves_mid_stream(
    net: Net, watcher: WatchProcess, case: Case, request: pytest.FixtureRequest
) -> None:
    with cpu_hog(case[3]):
        next_hop_moves(net, watcher, case, request.node.name)


def next_hop_moves(net: Net, watcher: WatchProcess, case: Case, name: str) -> None:
    v, bulk, nat, _ = case
    topo = net.topo
    net.ruleset(nat=nat)
    topo.reset()
    trace = Trace(name.replace("/", "_"))
    rsts = ResetSniffer(NSR)
    data = TcpDuplex(NSB, NSA, topo.a[v], bulk=bulk, rate=RATE)  # type: ignore[arg-type]
    control = TcpDuplex(NSB, NSA, topo.a[v], bulk=bulk, rate=2048, chunk=256, beat=0.25)  # type: ignore[arg-type]
    data.start()
    control.start()
    progress = Progress(data)
    since = time.time()
    results: list[Any] = []
    try:
        for d in (data, control):
            wait_for(lambda d=d: offloaded(d, v), 20, what=f"[OFFLOAD] for {d.client}")  # type: ignore[misc]
        data.wait_bulk(data.bulk_received + RATE // 2)
        before = {name: entry_of(d, v) for name, d in (("data", data), ("control", control))}
        trace.snap("before the change")
        t0 = topo.change(v)
        trace.snap("just after the change")
        data.wait_bulk(data.bulk_received + AFTER_CHANGE, timeout=15)
        trace.snap(f"{time.time() - t0:.2f} s after the change")
        # Repaired for good: offloaded on a path that delivers, both sides off the
        # classic path (a path cached before N2's neighbour entry was valid is not).
        wait_for(lambda: offloaded(data, v), 10, what="the data connection [OFFLOAD] again")
        for name in ("from_a", "from_b"):
            reset_counter(NSR, "observer", name)
        data.wait_bulk(data.bulk_received + CHECK_BYTES, timeout=10)
        classic = {n: observer_counter(NSR, n).packets for n in ("from_a", "from_b")}
        after = {name: entry_of(d, v) for name, d in (("data", data), ("control", control))}
    except BaseException:
        print(kernel_state(NSR, bridges=("br0", "br1", "br2")))
        raise
    finally:
        progress.close()
        results = [*data.stop(), *control.stop()]
        seen_rsts = rsts.close()
        trace.close(watcher, since)
    torn = [r for _, r in watcher.teardowns(t0)]
    # Stalls that start before the repair is over (the last teardown line, read late)
    # plus RESUME_LIMIT: what the change and its repair cost, not a later scheduling hiccup.
    repaired = max((ts for ts, _ in watcher.teardowns(t0)), default=t0)
    stall, stall_at = progress.longest_stall(t0, repaired + RESUME_LIMIT)
    raw = {f"{k} {when}": e and e.raw for when, es in (("before", before), ("after", after))
           for k, e in es.items()}  # fmt: skip
    print(
        f"\n{_case_id(case)}: longest stall {stall:.3f} s at +{stall_at - t0:.3f} s; "
        f"classic-path packets {classic}; entries {raw}; teardowns {torn}; RSTs {seen_rsts}"
    )
    for result in results:
        assert result.error is None and result.intact, (result, seen_rsts)
    assert seen_rsts == [], seen_rsts
    assert stall <= RESUME_LIMIT, f"stalled {stall:.3f} s from +{stall_at - t0:.3f} s"
    assert classic["from_a"] <= CLASSIC_MAX and classic["from_b"] <= CLASSIC_MAX, classic
    assert torn, "the watcher tore nothing down"
    for rec in torn:
        # Each deleted entry is back: re-created by us, or first by a packet (EEXIST).
        assert rec["deleted"] == rec["recreated"] + rec["created_by_traffic"], rec
        # Why: the route to B (IPv6: at once), or the new next hop (IPv4: resolved or
        # still unresolved; both: changed since an earlier teardown).
        why = (topo.hop(22, v, 2), f"route to {topo.b[v]} changed")
        assert any(w in "; ".join(rec["causes"]) for w in why), rec

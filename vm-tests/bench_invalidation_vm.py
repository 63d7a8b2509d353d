"""VM benchmark (one boot): recovery of an offloaded TCP flow after its host moved to another
port of the router's bridge, with ``offloadctl watch`` running vs without it.

Run: ``.venv/bin/python vm-tests/run --results build/vm-results -- $PWD/.venv/bin/python
vm-tests/bench_invalidation_vm.py [--runs N]``.

Topology and measurement as in ``suite/test_invalidation.py``: host A behind a switch is
re-cabled from br0 port p1 to p2 (and back, alternating) and announces itself; recovery is
the interval between two kernel timestamps on the new port: A's first frame (the FDB
learns the move from it) and the first segment from B leaving toward A. Rows:

- ``watch running``: the watcher tears the stale flow down;
- ``no watcher``: the same move; a run "recovers" only if B's traffic reaches the new port
  within the observation window (it does not: the flow keeps its cached port);
- ``no watcher + flows teardown``: after the window, an operator runs
  ``offloadctl flows teardown --mac A``; timed from the command's start (its Python start-up
  under TCG included) to B's first segment on the new port.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))
sys.path.insert(0, str(HERE.parent))

from topology import (  # noqa: E402
    NS2,
    NSA,
    NSR,
    FrameCapture,
    SwitchedTopology,
    TcpDuplex,
    WatchProcess,
    announce,
    build_switched,
    find_conntrack,
    wait_for,
)

from controlplane.loader import parse_config  # noqa: E402
from controlplane.service.ruleset import apply  # noqa: E402


def offloaded(d: TcpDuplex) -> bool:
    entries = find_conntrack(NSR, sport=d.client[1], dport=d.server[1])
    return len(entries) == 1 and entries[0].offloaded


def one_move(
    topo: SwitchedTopology, *, window: float, teardown_cli: bool = False
) -> tuple[float | None, float | None]:
    """Move A once; (recovery seconds or None within WINDOW, CLI recovery seconds or None)."""
    d = TcpDuplex(NSA, NS2, topo.b_ip).start()
    d.wait_bulk(32 * 1024)
    wait_for(lambda: offloaded(d), timeout=20, what="[OFFLOAD]")
    mac = topo.a_mac()
    new_port = f"p{3 - topo.uplink}"
    recovered: float | None = None
    by_cli: float | None = None

    def from_b(f: object) -> bool:
        return bool(f.outgoing and f.proto == 6 and f.dst == topo.a_ip)  # type: ignore[attr-defined]

    with FrameCapture(NSR, new_port) as cap:
        t_cmd = time.time()
        topo.move()
        announce(NSA, "eth0", topo.a_ip, mac)
        learned = cap.wait_first(lambda f: not f.outgoing and f.src_mac == mac, after=t_cmd)
        try:
            back = cap.wait_first(from_b, after=learned.ts, timeout=window)
            recovered = back.ts - learned.ts
        except TimeoutError:
            pass
        if recovered is None and teardown_cli:
            t0 = time.time()
            subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "flows", "teardown", "--mac", mac,
                 "--netns", NSR],
                check=True, capture_output=True,
            )  # fmt: skip
            back = cap.wait_first(from_b, after=t0, timeout=60)
            by_cli = back.ts - t0
    if recovered is None and not teardown_cli:
        topo.move()  # back to the cached port: the flow resumes
        announce(NSA, "eth0", topo.a_ip, mac)
    d.wait_bulk(d.bulk_received + 16 * 1024, timeout=60)
    bulk, beat = d.stop(timeout=60)
    assert bulk.intact and beat.intact, (bulk, beat)
    return recovered, by_cli


def row(name: str, values: list[float | None], note: str = "") -> None:
    got = [v * 1000 for v in values if v is not None]
    stats = (
        f"{min(got):>9.1f}{statistics.median(got):>9.1f}{max(got):>9.1f}"
        if got
        else f"{'-':>9}{'-':>9}{'-':>9}"
    )
    print(f"{name:<36}{len(got):>4}/{len(values):<4}{stats}  {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--window", type=float, default=2.0, help="stall observation, s")
    args = parser.parse_args()
    topo = build_switched()
    apply(
        parse_config(
            {
                "version": 1,
                "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}],
                "policies": [{"name": "all", "flowtable": "ft", "protocols": ["tcp"]}],
                "nat": {"masquerade": [{"oifname": "wan0"}]},
            }
        ),
        NSR,
    )
    try:
        without = [one_move(topo, window=args.window)[0] for _ in range(args.runs)]
        manual = [one_move(topo, window=args.window, teardown_cli=True)[1] for _ in range(2)]
        watcher = WatchProcess(NSR)
        watcher.wait_ready()
        try:
            with_watch = [one_move(topo, window=10.0)[0] for _ in range(args.runs)]
        finally:
            watcher.stop()
    finally:
        topo.teardown()
    print(
        "\nrecovery after a host move between two ports of the router's bridge"
        " (masqueraded TCP, QEMU/TCG, 2 vCPUs)"
    )
    print("from A's first frame on the new port to B's first segment leaving it (ms)")
    print(f"{'':<36}{'recovered':>9}{'min':>9}{'median':>9}{'max':>9}")
    row("offloadctl watch running", with_watch)
    row("no watcher", without, f"(no segment within {args.window:.1f} s = stalled)")
    row("no watcher, then flows teardown", manual, "(from the CLI's start, start-up included)")
    ok = [v for v in with_watch if v is not None]
    if ok and any(v is None for v in without):
        print(
            f"watch: median {statistics.median(ok) * 1000:.1f} ms; without it"
            f" {sum(v is None for v in without)}/{len(without)} moves stalled"
            f" for the whole {args.window:.1f} s window"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

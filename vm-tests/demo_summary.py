"""`make demo`: the one summary table, and the checks that make the demo fail in CI.

Reads what ``demo_agent.py`` (VM) and ``demo_reuseport.py`` (host) wrote. Each row shows
the measured figure next to its baseline from the same run. Exit 1 if a claim the demo
makes does not hold (a transfer not intact, nothing offloaded, a port that never joined,
no recovery after a move, a failed connection or no real migration across restarts).
Usage: ``python vm-tests/demo_summary.py --agent A.json --reuseport R.json [--vm-timing T]
[--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def load(path: Path | None) -> Any:
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def rows_agent(a: dict[str, Any] | None, problems: list[str]) -> list[tuple[str, str, str]]:
    if a is None:
        problems.append("VM part wrote no results (see its console output above)")
        return [("VM part", "no results", "")]
    rows: list[tuple[str, str, str]] = []
    if not a.get("ok"):
        problems.append(f"VM part failed: {a.get('error')}")
    c, o = a.get("classic"), a.get("offload")
    if c and o:
        share = 100 * o["hook_bytes"] / o["bytes"]
        base = 100 * c["hook_bytes"] / c["bytes"]
        rows.append(
            (
                "offload: bytes seen by the forward hook",
                f"{o['hook_bytes']:,} B of {mib(o['bytes'])} ({share:.3f} %),"
                f" {o['hook_packets']} pkts",
                f"no ruleset: {c['hook_bytes']:,} B of {mib(c['bytes'])} ({base:.0f} %),"
                f" {c['hook_packets']} pkts",
            )
        )
        if not (o["ok"] and c["ok"]):
            problems.append("a transfer did not arrive intact")
        if not o["offloaded"] or share > 1:
            problems.append(f"the transfer was not offloaded ({share:.1f} % on the classic path)")
    if "agent_start_s" in a:
        rows.append(
            (
                "agent start (apply + watcher)",
                f"{a['agent_start_s']:.1f} s under TCG; flowtable {a['flowtable_at_start']}",
                "",
            )
        )
    joins = a.get("join_ms")
    if joins:
        rows.append(
            (
                "new bridge port joins the flowtable",
                f"first {joins[0]:.0f} ms; p50 {statistics.median(joins):.0f} ms,"
                f" max {max(joins):.0f} ms ({len(joins)} joins)",
                "goal < 100 ms (TCG: slower than a real host)",
            )
        )
        leaves = a.get("leave_ms") or []
        if leaves:
            rows.append(("port leaves the flowtable", f"max {max(leaves):.0f} ms", ""))
    m = a.get("move")
    if m:
        w = m["with_invalidation_ms"]
        wo = m["without_recovered_ms"]
        rows.append(
            (
                "host moves to another port: stall",
                f"{w:.0f} ms with the agent ({m['torn_down']} flow torn down)"
                if w is not None
                else "NO recovery within 10 s",
                "invalidation off: "
                + (
                    f"still stalled after {m['without_window_s']:.0f} s"
                    if wo is None
                    else f"{wo:.0f} ms"
                )
                + f"{', flow [OFFLOAD] on the old port' if m['without_still_offloaded'] else ''};"
                + (
                    f" {m['manual_stall_s']:.1f} s with a manual teardown"
                    if m["manual_stall_s"] is not None
                    else " no recovery after a manual teardown"
                ),
            )
        )
        rows.append(
            (
                "the streams across the moves",
                f"{mib(m['stream_bytes'])}, intact {m['stream_intact']},"
                f" error {m['stream_error'] or 'none'}",
                "",
            )
        )
        if w is None:
            problems.append("no recovery after the host move with the agent's invalidation")
        if not m["stream_intact"]:
            problems.append("the stream across the moves was not intact")
    inv = a.get("invalidation") or {}
    if inv:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(inv.get("by_cause", {}).items()))
        rows.append(
            (
                "agent invalidations (by cause)",
                f"{causes or 'none'}; events {inv.get('events', 0)},"
                f" overflows {inv.get('overflows', 0)}, resyncs {inv.get('resyncs', 0)}",
                "",
            )
        )
    if a.get("ok") and (a.get("agent_exit") not in (0, None) or a.get("tracebacks")):
        problems.append(
            f"agent exit {a.get('agent_exit')}, traceback in its log: {a.get('tracebacks')}"
        )
    return rows


def rows_reuseport(
    r: list[dict[str, Any]] | None, problems: list[str]
) -> list[tuple[str, str, str]]:
    if r is None:
        problems.append("host reuseport part wrote no results")
        return [("hot restarts", "no results", "")]
    by = {x["mode"]: x for x in r}
    ag, base = by.get("agent"), by.get("none")
    for x in r:
        if "error" in x:
            problems.append(f"reuseport {x['mode']}: {x['error']}")
    if ag is None or "error" in ag:
        return [("hot restarts", "failed", "")]
    prog = ag.get("program") or {}
    mig = prog.get("migrated_established", 0) + prog.get("migrated_request", 0)
    base_txt = (
        f"no program: {base['failed']:,} of {base['attempts']:,} failed"
        f" ({', '.join(f'{k} {v}' for k, v in base['failures'].items()) or 'none'})"
        if base and "error" not in base
        else "n/a"
    )
    rows = [
        (
            f"hot restarts ({ag['restarts']} busy, under load)",
            f"{ag['failed']:,} of {ag['attempts']:,} connections failed",
            base_txt,
        ),
        (
            "  connections migrated off closing listeners",
            f"{mig:,} (program: {prog.get('migrated_established', 0)} established +"
            f" {prog.get('migrated_request', 0)} half-open; kernel {ag['kernel_migrated']:,})",
            f"no program: {base['kernel_migrated'] if base and 'error' not in base else 'n/a'}",
        ),
        (
            "  connect latency p50 / p99",
            f"{ag['connect_p50_ms']:.2f} / {ag['connect_p99_ms']:.1f} ms",
            f"{base['connect_p50_ms']:.2f} / {base['connect_p99_ms']:.1f} ms"
            if base and "error" not in base
            else "",
        ),
    ]
    if ag["failed"]:
        problems.append(f"{ag['failed']} connections failed across restarts with the program")
    if mig == 0 or ag["kernel_migrated"] == 0:
        problems.append("no connection was really migrated (only steering was shown)")
    if ag["restarts"] == 0:
        problems.append("no restart happened")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", type=Path)
    p.add_argument("--reuseport", type=Path)
    p.add_argument("--vm-timing", type=Path)
    p.add_argument("--seconds", type=float, help="the whole demo's wall time so far")
    args = p.parse_args()
    problems: list[str] = []
    rows: list[tuple[str, str, str]] = []
    rows += rows_agent(load(args.agent), problems)
    rows += rows_reuseport(load(args.reuseport), problems)
    timing = load(args.vm_timing)
    if timing:
        rows.append(
            (
                "VM (one boot, TCG)",
                f"boot {timing.get('boot_seconds') or 0:.1f} s,"
                f" total {timing.get('total_seconds') or 0:.1f} s",
                "",
            )
        )
    if args.seconds is not None:
        rows.append(("make demo wall time", f"{args.seconds:.0f} s", "budget 300 s"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    head = f"{'':<{w0}}  {'measured':<{w1}}  baseline / goal (same run)"
    print(head)
    print("-" * min(len(head) + 40, 160))
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}".rstrip())
    if problems:
        print("\nDEMO FAILED:")
        for prob in problems:
            print(f"  - {prob}")
        return 1
    print("\nall claims held")
    return 0


if __name__ == "__main__":
    sys.exit(main())

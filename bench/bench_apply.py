"""Apply benchmark: offloadctl's render+plan+apply vs raw ``nft -f`` of the same text.

Both sides build the same table from scratch in a fresh network namespace, in
the same run, alternating, median of several runs. With ``--devices N`` the
config also has a flowtable over N veth devices (needs a kernel with
flowtables: run it in the VM, ``make bench-vm``). On the host it uses rules
the host kernel supports (DNAT port forwards).

Goals (issue 7): fresh apply <= 1.5x raw nft; an unchanged re-apply (listing +
drift detection by content + plan, nothing sent) <= 0.5x a raw apply.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane import service
from controlplane.core import nft
from controlplane.core.plan import make_plan
from controlplane.core.render import render
from controlplane.kernel.nft.libnft import Nft
from controlplane.loader import parse_config

# Goals (issue 7), as ratios to raw ``nft -f`` measured in the same run.
GOAL_FRESH = 1.5
GOAL_UNCHANGED = 0.5


def sh(*args: str) -> None:
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {res.stderr.strip()[:2000]}")


def make_config(rules: int, devices: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 1,
        "nat": {
            "masquerade": [{"oifname": "wan0"}],
            "dnat": [
                {
                    "iifname": "wan0",
                    "port": 1024 + i,
                    "to": f"10.0.{i // 250}.{i % 250 + 1}",
                    "to_port": 80,
                }
                for i in range(rules)
            ],
        },
    }
    if devices:
        # The kernel caps a flowtable at 256 devices: spread them over several,
        # each with a policy for the traffic entering its devices.
        names = [f"d{i}" for i in range(devices)]
        per = 250
        cfg["flowtables"], cfg["policies"] = [], []
        for k in range(0, devices, per):
            ft = f"ft{k // per}"
            cfg["flowtables"].append({"name": ft, "devices": names[k : k + per]})
            cfg["policies"].append(
                {"name": f"p{k // per}", "flowtable": ft, "iifnames": names[k : k + per]}
            )
    return cfg


def setup_netns(devices: int) -> str:
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    batch = ["link add wan0 type veth peer name lan0"]
    batch += [f"link add d{i} type veth peer name e{i}" for i in range(devices)]
    with tempfile.NamedTemporaryFile("w", suffix=".ip") as f:
        f.write("\n".join(batch) + "\n")
        f.flush()
        sh("ip", "-n", ns, "-batch", f.name)
    return ns


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=0)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    cfg_data = make_config(args.rules, args.devices)
    cfg = parse_config(cfg_data)
    text = nft.ruleset_text(render(cfg))
    ns = setup_netns(args.devices)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
            f.write(text)
        ours, raw, noop, noop_gen, lib_text = [], [], [], [], []
        rs = render(cfg)
        txn = make_plan(rs, None).transaction
        ctx = Nft(ns)
        drop = nft.Transaction(rs.ref, (nft.DeleteTable(),))
        for _ in range(args.runs):
            raw.append(timed(lambda: sh("ip", "netns", "exec", ns, "nft", "-f", f.name)))
            ctx.run(drop)
            # The library path: the config is parsed (the loader's cost is in
            # bench_cli's whole-command numbers).
            ours.append(timed(lambda: service.apply(cfg, ns)))
            noop.append(timed(lambda: service.apply(cfg, ns)))
            noop_gen.append(timed(lambda: service.apply(cfg, ns)))
            ctx.run(drop)
            # The libnftables floor: the same transaction, already rendered.
            lib_text.append(timed(lambda: ctx.run(txn)))
            ctx.run(drop)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        Path(f.name).unlink(missing_ok=True)

    med_raw, med_ours, med_noop, med_gen = (
        statistics.median(x) * 1000 for x in (raw, ours, noop, noop_gen)
    )
    rule_count = text.count(" comment ")
    print(
        f"\napply benchmark: {rule_count} rules, {args.devices} flowtable devices,"
        f" median of {args.runs} runs (ms)"
    )
    # Two ratios: of medians (the goal) and of minimums (what the code costs
    # when the shared machine is not busy elsewhere).
    print(f"{'case':<44}{'median':>9}{'min':>9}{'max':>9}{'ratio':>8}{'min/min':>9}  goal")
    rows = [
        ("raw nft -f (baseline, same text)", raw, ""),
        ("offloadctl apply (lock+render+plan+commit)", ours, f"<= {GOAL_FRESH}x"),
        ("apply, unchanged: full listing + drift check", noop, ""),
        ("apply, unchanged: generation id verified", noop_gen, f"<= {GOAL_UNCHANGED}x"),
        ("  floor: libnftables text, pre-rendered", lib_text, ""),
    ]
    for name, xs, goal in rows:
        ms = [x * 1000 for x in xs]
        ratio = statistics.median(xs) * 1000 / med_raw
        ratio_min = min(xs) / min(raw)
        print(
            f"{name:<44}{statistics.median(ms):>9.1f}{min(ms):>9.1f}{max(ms):>9.1f}"
            f"{ratio:>7.2f}x{ratio_min:>8.2f}x  {goal}"
        )
    fresh, unchanged = med_ours / med_raw, med_gen / med_raw
    print(
        f"goal fresh apply <= {GOAL_FRESH}x raw nft:"
        f" {'met' if fresh <= GOAL_FRESH else 'NOT met'} ({fresh:.2f}x)"
    )
    print(
        f"goal unchanged re-apply <= {GOAL_UNCHANGED}x raw nft:"
        f" {'met' if unchanged <= GOAL_UNCHANGED else 'NOT met'}"
        f" ({unchanged:.2f}x, {med_gen:.1f} ms; first re-apply after a change lists the"
        f" table: {med_noop / med_raw:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

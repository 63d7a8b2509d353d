"""Apply benchmark: offloadctl's render+plan+apply vs raw ``nft -f`` of the same text.

Both sides build the same table from scratch in a fresh network namespace, in
the same run, alternating, median of several runs. With ``--devices N`` the
config also has a flowtable over N veth devices (needs a kernel with
flowtables: run it in the VM, ``make bench-vm``). On the host it uses rules
the host kernel supports (DNAT port forwards).

Goals (issue 7): fresh apply <= 1.5x raw nft; an unchanged re-apply (listing +
drift detection by content + plan, nothing sent) <= 0.5x a raw apply.

Each case is timed twice over: wall clock, and CPU time (user + system; the
kernel's work on a batch runs in the sender's system time, so both sides pay
it). Wall ratios swing with whatever else this shared machine runs; CPU ratios
barely do, so the verdict is on CPU time and both are printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nftables

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import port_forwards  # bench/ is the script's directory

from controlplane import service
from controlplane.core import nft
from controlplane.core.plan import make_plan
from controlplane.core.render import render
from controlplane.kernel.netns import entered
from controlplane.kernel.nft.genid import ruleset_generation
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
        "nat": port_forwards(rules),
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


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (nft -f)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


class Sample(list[tuple[float, float]]):
    """(wall, cpu) seconds per run."""

    def wall(self) -> list[float]:
        return [w for w, _ in self]

    def cpu(self) -> list[float]:
        return [c for _, c in self]


def _has_json(op: nft.Op, ref: nft.TableRef) -> bool:
    try:
        op.json(ref)
    except NotImplementedError:
        return False
    return True


def timed(fn: Any) -> tuple[float, float]:
    c, t = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t, _cpu() - c


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
        ours, raw, noop, noop_gen, lib_text = Sample(), Sample(), Sample(), Sample(), Sample()
        sub_text, sub_json = Sample(), Sample()
        rs = render(cfg)
        txn = make_plan(rs, None).transaction
        ctx = Nft(ns)
        # Why the adapter sends text (kernel/nft/libnft.py): the operations JSON
        # can express (not the serial), sent once as text and once as JSON.
        sub = nft.Transaction(txn.ref, tuple(op for op in txn.ops if _has_json(op, txn.ref)))
        with entered(ns):
            json_ctx = nftables.Nftables()

        def json_apply() -> None:
            rc, _out, err = json_ctx.json_cmd(sub.to_json())
            if rc != 0:
                raise SystemExit(f"libnftables JSON apply failed: {err}")

        drop = nft.Transaction(rs.ref, (nft.DeleteTable(),))

        def clear() -> None:
            """Drop the table and wait until the kernel has finished with it
            (untimed): at 1,000 rules the namespace's next nftables request
            waits ~10-20 ms after a table delete returns (measured), which
            would land on whichever case runs next (ours: its generation read)."""
            ctx.run(drop)
            ruleset_generation(ns)

        for _ in range(args.runs):
            raw.append(timed(lambda: sh("ip", "netns", "exec", ns, "nft", "-f", f.name)))
            clear()
            # The library path: the config is parsed (the loader's cost is in
            # bench_cli's whole-command numbers).
            ours.append(timed(lambda: service.apply(cfg, ns)))
            noop.append(timed(lambda: service.apply(cfg, ns)))
            noop_gen.append(timed(lambda: service.apply(cfg, ns)))
            clear()
            # The libnftables floor: the same transaction, already rendered.
            lib_text.append(timed(lambda: ctx.run(txn)))
            clear()
            sub_text.append(timed(lambda: ctx.run(sub)))
            clear()
            sub_json.append(timed(json_apply))
            clear()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        Path(f.name).unlink(missing_ok=True)

    def med(xs: Sample, cpu: bool = False) -> float:
        return statistics.median(xs.cpu() if cpu else xs.wall()) * 1000

    rule_count = text.count(" comment ")
    print(
        f"\napply benchmark: {rule_count} rules, {args.devices} flowtable devices,"
        f" median of {args.runs} runs (ms), load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'case':<46}{'median':>8}{'min':>8}{'max':>8}{'ratio':>8}"
        f"{'cpu ms':>8}{'cpu ratio':>10}  goal"
    )
    rows = [
        ("raw nft -f (baseline, same text)", raw, ""),
        ("offloadctl apply (lock+render+plan+commit)", ours, f"<= {GOAL_FRESH}x"),
        ("apply, unchanged: full listing + drift check", noop, ""),
        ("apply, unchanged: generation id verified", noop_gen, f"<= {GOAL_UNCHANGED}x"),
        ("  floor: libnftables text, pre-rendered", lib_text, ""),
        ("  text, without the serial", sub_text, ""),
        ("  the same as JSON (libnftables json_cmd)", sub_json, ""),
    ]
    for name, xs, goal in rows:
        ms = [x * 1000 for x in xs.wall()]
        print(
            f"{name:<46}{statistics.median(ms):>8.1f}{min(ms):>8.1f}{max(ms):>8.1f}"
            f"{med(xs) / med(raw):>7.2f}x{med(xs, True):>8.1f}"
            f"{med(xs, True) / med(raw, True):>9.2f}x  {goal}"
        )
    for what, xs, limit in (
        ("fresh apply", ours, GOAL_FRESH),
        ("unchanged re-apply", noop_gen, GOAL_UNCHANGED),
    ):
        cpu, wall = med(xs, True) / med(raw, True), med(xs) / med(raw)
        print(
            f"goal {what} <= {limit}x raw nft: {'met' if cpu <= limit else 'NOT met'}"
            f" (CPU {cpu:.2f}x; wall {wall:.2f}x{'' if wall <= limit else ', over: machine busy?'})"
        )
    listing = med(noop, True) / med(raw, True)
    print(f"first re-apply after a change lists the table: CPU {listing:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Whole-command timings: ``offloadctl`` as a user runs it, against baselines
measured in the same run (``python -c pass``, ``nft --version``, ``nft -f`` of
offloadctl's own rendering).

    sudo .venv/bin/python bench/bench_cli.py [--runs N] [--tree DIR]

Each row is a fresh process per run (median and fastest of N). The apply rows
need root: each run gets a new network namespace, created and deleted here;
offloadctl and nft both run under ``ip netns exec`` so they pay the same
namespace entry. ``--tree DIR`` times another checkout's ``controlplane``
(e.g. an older commit) with this venv's Python, for before/after numbers.

Compiled bytecode is allowed to be written (PYTHONDONTWRITEBYTECODE is removed
from the children's environment) and one warm-up run precedes each row, as a
normal install has its .pyc files.

Where valgrind is installed, each command also runs once under callgrind and
the table shows its instructions (user space only: the kernel's work on an nft
batch is not in them). On this shared 2-CPU machine milliseconds swing with
load; instruction counts do not, so the floor rows (``python -c pass``, the
import of the dependencies the user chose, ``nft --version``) show how much
of a command is Python's, the dependencies' and ours.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "nft" / "examples" / "seed.yaml"
GOAL_STARTUP_MS = 100.0
GOAL_APPLY_RATIO = 3.0
INSTRUCTIONS = True  # --no-instructions: no callgrind runs

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def dnat_config(n: int) -> str:
    """n port forwards, one block mapping per rule (as people write them)."""
    lines = ["version: 1", "nat:", "  dnat:"]
    for i in range(n):
        lines += [
            "    - iifname: wan0",
            "      protocol: tcp",
            f"      port: {1000 + i}",
            f"      to: 10.0.{i // 250}.{i % 250 + 1}",
            "      to_port: 80",
        ]
    return "\n".join(lines) + "\n"


def _child_cpu_ms() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * 1000


def run(cmd: Sequence[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")


def instructions(cmd: Sequence[str], cwd: Path) -> float | None:
    """Instructions (user space) of one run of ``cmd`` under callgrind, or None."""
    valgrind = shutil.which("valgrind")
    if not valgrind or not INSTRUCTIONS:
        return None
    # after "ip netns exec NS": callgrind follows no exec, so it must run the command itself
    split = 4 if list(cmd[:3]) == ["ip", "netns", "exec"] else 0
    res = subprocess.run(
        [
            *cmd[:split],
            valgrind,
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            *cmd[split:],
        ],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", res.stderr)
    return int(found.group(1)) / 1e6 if res.returncode == 0 and found else None


def timed(
    cmd: Sequence[str],
    cwd: Path,
    runs: int,
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> Timing:
    """Wall-clock and CPU ms of ``runs`` fresh processes (set-up and clean-up
    untimed), and the instructions of one more run."""
    out = Timing([], [])
    for i in range(runs + 1):  # the first run warms caches and writes .pyc files
        if before:
            before()
        c0, t0 = _child_cpu_ms(), time.perf_counter()
        run(cmd, cwd)
        elapsed, cpu = (time.perf_counter() - t0) * 1000, _child_cpu_ms() - c0
        if after:
            after()
        if i:
            out.wall.append(elapsed)
            out.cpu.append(cpu)
    if before:
        before()
    out.instr = instructions(cmd, cwd)
    if after:
        after()
    return out


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]  # user + system of the process: less noisy on a busy machine
    instr: float | None = None  # millions, one run under callgrind


class Netns:
    """A fresh namespace per run: created before, deleted after (untimed)."""

    def __init__(self) -> None:
        self.name = f"offloadctl-bench-{os.getpid()}"

    def create(self) -> None:
        self.delete()
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        # The rules match wan0: apply checks that the device exists (issue 14).
        subprocess.run(
            ["ip", "-n", self.name, "link", "add", "wan0", "type", "veth", "peer", "name", "lan0"],
            check=True,
        )

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def exec(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]


def row(
    table: list[tuple[str, ...]],
    name: str,
    t: Timing,
    base_name: str,
    base: Timing,
    goal: str = "",
) -> None:
    med, bmed = statistics.median(t.wall), statistics.median(base.wall)
    cpu, bcpu = statistics.median(t.cpu), statistics.median(base.cpu)
    table.append(
        (
            name,
            f"{med:.1f}",
            f"{min(t.wall):.1f}",
            f"{cpu:.1f}",
            f"{t.instr:.0f}" if t.instr else "-",
            base_name,
            f"{bmed:.1f}",
            f"{bcpu:.1f}",
            f"{base.instr:.0f}" if base.instr else "-",
            f"{med / bmed:.2f}x",
            f"{cpu / bcpu:.2f}x" if bcpu else "-",
            f"{t.instr / base.instr:.2f}x" if t.instr and base.instr else "-",
            goal,
        )
    )


def show(table: list[tuple[str, ...]]) -> None:
    head = (
        "whole command",
        "median ms",
        "min ms",
        "cpu ms",
        "M instr",
        "baseline (same run)",
        "median ms",
        "cpu ms",
        "M instr",
        "ratio",
        "cpu ratio",
        "instr ratio",
        "goal",
    )
    rows = [head, *table]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i in (0, 5, 12) else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--apply-runs", type=int, default=7)
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose controlplane to time")
    ap.add_argument("--no-apply", action="store_true", help="start-up and validate rows only")
    ap.add_argument(
        "--no-instructions", action="store_true", help="skip the callgrind runs (valgrind)"
    )
    args = ap.parse_args(argv)
    global INSTRUCTIONS
    INSTRUCTIONS = not args.no_instructions
    tree = args.tree.resolve()
    offloadctl = [sys.executable, "-m", "controlplane.cli"]
    nft = shutil.which("nft")
    table: list[tuple[str, ...]] = []

    with tempfile.TemporaryDirectory(prefix="offloadctl-bench-") as tmp:
        big = Path(tmp) / f"dnat-{args.rules}.yaml"
        big.write_text(dnat_config(args.rules))
        rendering = Path(tmp) / "rendering.nft"
        rendered = subprocess.run(
            [*offloadctl, "render", str(big), "--format", "nft"],
            cwd=tree,
            env=ENV,
            capture_output=True,
            text=True,
            check=True,
        )
        rendering.write_text(rendered.stdout)

        python = timed([sys.executable, "-c", "pass"], tree, args.runs)
        # The floor: importing the dependencies the user chose, nothing of ours.
        # typer >= 0.2x coerces parameters through pydantic (typer._adapters
        # imports pydantic's types and fields): the second row is what any
        # typer command with a parameter imports before our code runs.
        deps = timed([sys.executable, "-c", "import pydantic, typer, yaml"], tree, args.runs)
        deps_cli = timed(
            [sys.executable, "-c", "import pydantic, typer, typer._adapters, yaml"], tree, args.runs
        )
        row(table, "import pydantic, typer, yaml", deps, "python -c pass", python)
        row(table, "  + typer's pydantic adapters", deps_cli, "python -c pass", python)
        startup = timed([*offloadctl, "validate", str(SEED)], tree, args.runs)
        goal = f"<= {GOAL_STARTUP_MS:.0f} ms"
        row(table, "offloadctl validate seed.yaml", startup, "python -c pass", python, goal)
        row(table, "offloadctl validate seed.yaml", startup, "the imports above", deps_cli)
        if nft:
            nft_version = timed([nft, "--version"], tree, args.runs)
            row(table, "offloadctl validate seed.yaml", startup, "nft --version", nft_version)
        try:
            version = timed([*offloadctl, "--version"], tree, args.runs)
            row(table, "offloadctl --version", version, "python -c pass", python)
        except SystemExit as exc:  # an older tree without --version
            print(exc, file=sys.stderr)
        validate_big = timed([*offloadctl, "validate", str(big)], tree, args.runs)
        row(
            table,
            f"offloadctl validate ({args.rules} DNAT)",
            validate_big,
            "python -c pass",
            python,
        )

        if args.no_apply:
            pass
        elif os.geteuid() != 0 or not nft:
            print("bench: apply rows skipped (need root and nft)", file=sys.stderr)
        else:
            ns = Netns()
            try:
                raw = timed(
                    ns.exec(nft, "-f", str(rendering)), tree, args.apply_runs, ns.create, ns.delete
                )
                fresh = timed(
                    ns.exec(*offloadctl, "apply", str(big)),
                    tree,
                    args.apply_runs,
                    ns.create,
                    ns.delete,
                )
                ratio = f"<= {GOAL_APPLY_RATIO:.0f}x"
                row(
                    table,
                    f"offloadctl apply ({args.rules} DNAT, fresh netns)",
                    fresh,
                    "nft -f its rendering",
                    raw,
                    ratio,
                )
                ns.create()
                run(ns.exec(*offloadctl, "apply", str(big)), tree)
                again = timed(ns.exec(*offloadctl, "apply", str(big)), tree, args.apply_runs)
                row(
                    table,
                    f"offloadctl apply ({args.rules} DNAT, unchanged)",
                    again,
                    "nft -f its rendering",
                    raw,
                )
            finally:
                ns.delete()

    print(
        f"offloadctl whole-command timings ({tree}, {os.cpu_count()} CPUs,"
        f" load {os.getloadavg()[0]:.1f})"
    )
    show(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

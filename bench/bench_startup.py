"""Agent start-up at scale (issue 16, item 6): time to "running" and RSS at 100,000 flows.

Host netns or the VM (``vm-tests/run -- python bench/bench_startup.py``), real kernel:
the lab of ``bench_invalidation.py`` (bridge br0 with 4 ports, 1,000 LAN clients, 100
TCP entries each: 100,000 conntrack entries made with batched CT_NEW), then the real
agent (``offloadctl agent``, invalidation enabled, the test-only switch that indexes
every entry as offloaded: the host has no flowtables, and it makes the index the same
size in both places).

Rows (each with its baseline from the same run):

1. **time to "running"**: agent start -> its sd_notify ``READY=1`` (a datagram on our
   own ``NOTIFY_SOCKET``), with every entry indexed. Baseline: ``conntrack -L`` of the
   same table (the CLI's own full dump, in the namespace), same run.
2. **RSS at 100,000 indexed flows** (``VmRSS`` once running), with where it is
   (``/proc/PID/smaps_rollup``: anonymous, of which transparent huge pages, file) and the
   machine's THP mode. Baseline: the same imports in a bare interpreter, same run. Goal
   <= 64 MB.
3. **a MAC move during the start-up dump**: the move is sent as soon as the agent
   subscribed (its first log line); seconds from the move to the agent's "tore down" line
   for that client, against the start-up dump's own length (the old path waited for it).

Usage: ``python bench/bench_startup.py [--flows 100000]`` (root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_invalidation import (  # bench/ is the script's directory
    PORTS,
    WATCH_IMPORTS,
    build_lab,
    client_mac,
    create_flows,
    python_rss,
    sh,
)

PY = [sys.executable, "-m", "controlplane.cli"]
GOAL_RSS_MB = 64.0


def smaps(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in KiB by field, plus VmRSS/VmHWM."""
    out: dict[str, int] = {}
    for name in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/status"):
        with open(name) as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key.strip()] = int(parts[0])
    return out


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "?"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def cli_dump_seconds(ns: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["ip", "netns", "exec", ns, "conntrack", "-L"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - t0


def run_agent(ns: str, tmp: Path, move_port: int | None) -> dict[str, Any]:
    """Start the agent, wait for READY=1; optionally move client 0 once it subscribed."""
    cfg = tmp / "agent.json"
    cfg.write_text(json.dumps({"version": 1, "invalidation": {"enabled": True}}))
    notify_path = tmp / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        notify_path.unlink()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(600)
    log_path = tmp / "agent.log"
    env = os.environ | {
        "NOTIFY_SOCKET": str(notify_path),
        "OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED": "1",
    }
    cmd = [
        *PY, "agent", str(cfg), "--netns", ns, "--socket", str(tmp / "agent.sock"),
        "--state-file", str(tmp / "state.json"), "--watch-interval", "0", "--log-format", "json",
    ]  # fmt: skip
    moved_at = None
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        if move_port is not None:
            # The agent logs "watching" after start(): the first table line comes before the
            # invalidation service subscribes; wait for the watcher's subscription instead
            # (its rtnetlink socket shows in /proc/PID/net/netlink as soon as it exists).
            deadline = time.monotonic() + 600
            while not _subscribed(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            sh(
                "bridge", "fdb", "replace", client_mac(0), "dev", f"p{move_port}",
                "master", "static", netns=ns,
            )  # fmt: skip
            moved_at = time.monotonic()
        while True:
            data = notify.recv(4096).decode()
            if "READY=1" in data:
                break
        running = time.monotonic() - t0
        mem = smaps(proc.pid)
        torn_after = None
        if moved_at is not None:
            deadline = time.monotonic() + 120
            while torn_after is None and time.monotonic() < deadline:
                torn_after = _torn_at(log_path)
                time.sleep(0.05)
        dumped = _dump_line(log_path)
    finally:
        proc.terminate()
        proc.wait(60)
        notify.close()
    return {
        "running": running,
        "mem": mem,
        "moved_at": None if moved_at is None else moved_at - t0,
        "torn": torn_after,
        "dumped": dumped,
        "start": t0,
    }


def _subscribed(pid: int) -> bool:
    """Has PID a NETLINK_ROUTE socket bound to multicast groups (the watcher's)?"""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    with open("/proc/net/netlink") as f:
        next(f)
        for line in f:
            cols = line.split()
            # sk Eth Pid Groups ... Inode: protocol 0 = NETLINK_ROUTE, groups non-zero.
            if cols[1] == "0" and cols[3] != "00000000" and f"socket:[{cols[-1]}]" in inodes:
                return True
    return False


def _records(log_path: Path) -> list[dict[str, Any]]:
    out = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _torn_at(log_path: Path) -> float | None:
    for rec in _records(log_path):
        if rec.get("msg") == "tore down" and client_mac(0) in json.dumps(rec):
            return 1.0
    return None


def _dump_line(log_path: Path) -> dict[str, Any] | None:
    return next((r for r in _records(log_path) if r.get("msg") == "watching"), None)


def _raise_conntrack_max(at_least: int) -> None:
    """The VM's 1 GiB makes the kernel's default table limit 65,536 (ENOMEM past it);
    the limit is global, set in the initial namespace."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    if int(path.read_text()) < at_least:
        path.write_text(str(at_least))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--per-client", type=int, default=100)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_startup needs root (network namespaces, conntrack)")
    clients = args.flows // args.per_client
    _raise_conntrack_max(2 * args.flows)
    ns, _ports = build_lab(clients)
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-", dir="/run"))
    try:
        created = create_flows(ns, clients, args.per_client)
        print(
            f"lab: {clients} clients x {args.per_client} flows (CT_NEW in {created:.1f} s);"
            f" {os.cpu_count()} CPUs, page {os.sysconf('SC_PAGE_SIZE')} B, THP {thp_mode()}"
        )
        base = cli_dump_seconds(ns)
        r = run_agent(ns, tmp, move_port=None)
        mem = r["mem"]
        imports = python_rss(WATCH_IMPORTS)
        print()
        print(f"{'agent start-up, ' + str(args.flows) + ' entries':<52}{'seconds':>9}")
        print(f"{'  offloadctl agent: start -> READY=1 (all indexed)':<52}{r['running']:>9.2f}")
        print(f"{'  baseline: conntrack -L (the CLI, full dump)':<52}{base:>9.2f}")
        print(f"  ratio: {r['running'] / base:.2f}x the CLI's dump")
        print()
        rss = mem.get("VmRSS", 0) / 1024
        print(f"{'RSS at ' + str(args.flows) + ' indexed flows':<52}{'MB':>9}")
        print(f"{'  offloadctl agent (VmRSS once running)':<52}{rss:>9.1f}")
        print(
            f"{'    anonymous / of it THP / file':<52}"
            f"{mem.get('Anonymous', 0) / 1024:>9.1f} / {mem.get('AnonHugePages', 0) / 1024:.1f}"
            f" / {(mem.get('Rss', 0) - mem.get('Anonymous', 0)) / 1024:.1f}"
        )
        print(f"{'  baseline: the same imports, no flows':<52}{imports:>9.1f}")
        verdict = "met" if rss <= GOAL_RSS_MB else "NOT met"
        print(f"  ratio: {rss / imports:.2f}x the imports; goal <= {GOAL_RSS_MB:.0f} MB: {verdict}")
        print(json.dumps({"mem_kib": mem}))
    finally:
        sh("ip", "netns", "del", ns)
        shutil.rmtree(tmp, ignore_errors=True)
    _ = PORTS
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

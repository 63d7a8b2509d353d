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
2. **RSS at 100,000 indexed flows**: ``VmRSS`` once running and its highest value over
   the next ``--steady`` seconds (the periodic kernel view dumps conntrack every 10 s on a
   helper thread), the peak since start (``VmHWM``), with where it is
   (``/proc/PID/smaps_rollup``: anonymous, of which transparent huge pages, file), the
   machine's THP mode and whether the agent opted out of it (``THP_enabled`` in
   ``/proc/PID/status``: docs/agent.md, *Memory*). Baseline: the agent's imports in a
   bare interpreter, and the same with typer (which the agent imported before it
   started without it: cli/agent_cmd.py), same run. Goal <= 64 MB.
A move during the start-up dump is the VM suite's (``vm-tests/suite/test_startup.py``).

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_invalidation import (  # bench/ is the script's directory
    BARE_PYTHON,
    build_lab,
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
                elif key == "THP_enabled":  # 0: the agent's prctl(PR_SET_THP_DISABLE)
                    out[key] = int(value)
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


def run_agent(ns: str, tmp: Path, steady: float) -> tuple[float, dict[str, int]]:
    """Start the agent; seconds to its READY=1, its memory then and its highest RSS
    over the next ``steady`` seconds."""
    cfg = tmp / "agent.json"
    cfg.write_text(json.dumps({"version": 1, "invalidation": {"enabled": True}}))
    notify_path = tmp / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        notify_path.unlink()
    env = os.environ | {
        "NOTIFY_SOCKET": str(notify_path),
        "OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED": "1",
    }
    cmd = [
        *PY, "agent", str(cfg), "--netns", ns, "--socket", str(tmp / "agent.sock"),
        "--state-file", str(tmp / "state.json"), "--watch-interval", "0", "--log-format", "json",
    ]  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(900)
        with open(tmp / "agent.log", "wb") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while "READY=1" not in notify.recv(4096).decode():
                pass
            running = time.monotonic() - t0
            at_ready = smaps(proc.pid)
            # Steady state: the periodic kernel view (a conntrack dump every 10 s, on a
            # helper thread) comes and goes; its highest point is what counts.
            peak, until = at_ready["VmRSS"], time.monotonic() + steady
            while time.monotonic() < until:
                time.sleep(0.2)
                peak = max(peak, smaps(proc.pid)["VmRSS"])
            return running, at_ready | {"steady_max": peak, "hwm_end": smaps(proc.pid)["VmHWM"]}
        finally:
            proc.terminate()
            proc.wait(60)


def _raise_conntrack_max(at_least: int) -> None:
    """The VM's 1 GiB makes the kernel's default table limit 65,536 (ENOMEM past it);
    the limit is global, set in the initial namespace."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    if int(path.read_text()) < at_least:
        path.write_text(str(at_least))


# What ``offloadctl agent`` imports (cli/agent_cmd.py: not typer or click), and the
# same with the typer command of every other verb (what it imported before).
AGENT_IMPORTS = (
    "import controlplane.cli.agent_cmd, controlplane.agent.daemon, controlplane.loader,"
    " controlplane.agent.invalidation, controlplane.service.applier,"
    " controlplane.service.kernel_view\n"
)
WITH_TYPER = AGENT_IMPORTS + "import controlplane.cli.agent\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--per-client", type=int, default=100)
    ap.add_argument("--steady", type=float, default=40.0, help="seconds of steady state")
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
        running, mem = run_agent(ns, tmp, args.steady)
        imports = python_rss(AGENT_IMPORTS + BARE_PYTHON)
        typer_too = python_rss(WITH_TYPER + BARE_PYTHON)
        print()
        print(f"{'agent start-up, ' + str(args.flows) + ' entries':<52}{'seconds':>9}")
        print(f"{'  offloadctl agent: start -> READY=1 (all indexed)':<52}{running:>9.2f}")
        print(f"{'  baseline: conntrack -L (the CLI, full dump)':<52}{base:>9.2f}")
        print(f"  ratio: {running / base:.2f}x the CLI's dump")
        print()
        rss = mem["steady_max"] / 1024
        print(f"{'RSS at ' + str(args.flows) + ' indexed flows':<52}{'MB':>9}")
        print(f"{'  offloadctl agent, once running':<52}{mem['VmRSS'] / 1024:>9.1f}")
        label = f"  highest over {args.steady:.0f} s (kernel views every 10 s)"
        print(f"{label:<52}{rss:>9.1f}")
        print(f"{'  peak since start (VmHWM)':<52}{mem['hwm_end'] / 1024:>9.1f}")
        print(
            f"{'    anonymous / of it THP / file':<52}"
            f"{mem.get('Anonymous', 0) / 1024:>9.1f} / {mem.get('AnonHugePages', 0) / 1024:.1f}"
            f" / {(mem.get('Rss', 0) - mem.get('Anonymous', 0)) / 1024:.1f}"
        )
        thp = "off (prctl)" if mem.get("THP_enabled") == 0 else "on"
        print(f"{'    huge pages for the agent (THP ' + thp_mode() + ')':<52}{thp:>9}")
        print(f"{'  baseline: the same imports, no flows':<52}{imports:>9.1f}")
        print(f"{'    the same with typer (what the agent started with)':<52}{typer_too:>9.1f}")
        verdict = "met" if rss <= GOAL_RSS_MB else "NOT met"
        print(f"  ratio: {rss / imports:.2f}x the imports; goal <= {GOAL_RSS_MB:.0f} MB: {verdict}")
        print(json.dumps({"mem_kib": mem}))
    finally:
        sh("ip", "netns", "del", ns)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`, host part: hot restarts under load with zero failed connections.

Runs on the host (real kernel, fresh network namespaces; BPF needs no VM and Python
starts ~20x faster here than under TCG). ``offloadctl agent`` loads and owns the
reuseport group named in its config; ``examples/reuseport_service.py`` registers its
listeners in it and restarts itself on SIGHUP with ``--busy-restart``: the old generation
stops accepting while its successor starts (a busy or naive server), so every connection
arriving meanwhile queues on listeners that are about to close. The program migrates
that accept queue to the new generation: the migration counters (the program's and the
kernel's ``TCPMigrateReqSuccess``) show the connections that really moved, and the client
sees no failure. The baseline, same service and load without the program, resets them.

A client process (``bench/bench_reuseport.py --client``) opens ``--rate`` connections/s
from its own namespace over a veth pair; each sends a line and waits for the answer.
Usage: ``python vm-tests/demo_reuseport.py --out FILE.json`` (root).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.reuseport_lab import (  # noqa: E402 - after the sys.path tweak
    PORT,
    PR_SET_CHILD_SUBREAPER,
    SERVER_IP,
    build,
    gunicorn_cmd,
    migrate_stats,
    percentile,
    read_pid,
    reap,
    run_server,
    veth_lab,
    wait_file,
)

SERVICE = REPO / "examples" / "reuseport_service.py"
CLIENT = REPO / "bench" / "bench_reuseport.py"
GROUP = "web"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"  [host +{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


class AgentProc:
    def __init__(self, tmp: Path, netns: str, bpffs: Path) -> None:
        self.dir = tmp / f"agent-{netns}"
        (self.dir / "run").mkdir(parents=True, mode=0o700)
        self.config = self.dir / "agent.json"
        self.socket = self.dir / "run" / "agent.sock"
        self.log = self.dir / "agent.log"
        self.netns = netns
        cfg = {
            "version": 1,
            "reuseport": {"bpffs": str(bpffs), "groups": [{"name": GROUP, "max_listeners": 16}]},
        }
        self.config.write_text(json.dumps(cfg, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "controlplane.cli", "agent", str(self.config),
                    "--netns", self.netns, "--socket", str(self.socket),
                    "--state-file", str(self.dir / "state.json"), "--watch-interval", "0",
                    "--cleanup-on-exit",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
            with contextlib.suppress(Exception):
                if self.status():
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not answer within 60 s")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        from controlplane.agent import control

        client = control.connect(self.socket)
        if client is None:
            return {}
        with client:
            resp = client.call("status", timeout=30)
        if not resp.ok:
            raise RuntimeError(resp.error_message)
        return resp.result

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def run_mode(mode: str, args: argparse.Namespace, tmp: Path, bpffs: Path) -> dict[str, Any]:
    """One service under load, ``args.restarts`` busy restarts; ``mode`` is ``agent``
    (the agent's reuseport group + program) or ``none`` (no program: the baseline)."""
    with veth_lab("demo") as (srv, cli):
        return _run_mode(srv, cli, mode, args, tmp, bpffs)


def _run_mode(
    srv: str, cli: str, mode: str, args: argparse.Namespace, tmp: Path, bpffs: Path
) -> dict[str, Any]:
    agent: AgentProc | None = None
    service: subprocess.Popen[bytes] | None = None
    pidfile = tmp / f"{mode}.pid"
    out: dict[str, Any] = {"mode": mode}
    try:
        group: list[str] = []
        if mode == "agent":
            agent = AgentProc(tmp, srv, bpffs)
            secs = agent.start()
            say(f"offloadctl agent --netns {srv}: group {GROUP!r} loaded, answering after"
                f" {secs:.1f} s")  # fmt: skip
            group = ["--group", GROUP, "--bpffs", str(bpffs)]
        service = subprocess.Popen(
            [
                sys.executable, str(SERVICE), "--netns", srv, "--host", SERVER_IP,
                "--port", str(PORT), "--workers", "2", "--pidfile", str(pidfile),
                "--busy-restart", "--quiet", *group,
            ]
        )  # fmt: skip
        wait_file(str(pidfile))
        stop_file, out_file = tmp / f"{mode}.stop", tmp / f"{mode}.json"
        client = subprocess.Popen(
            [
                sys.executable, str(CLIENT), "--client", cli, "--rate", str(args.rate),
                "--stop-file", str(stop_file), "--out", str(out_file),
            ]
        )  # fmt: skip
        time.sleep(args.warmup)  # steady load before the first restart, not a sync
        restarts, handover_ms = 0, []
        for _ in range(args.restarts):
            old = read_pid(str(pidfile))
            t = time.monotonic()
            os.kill(old, signal.SIGHUP)
            deadline = t + 15
            while read_pid(str(pidfile)) == old and time.monotonic() < deadline:
                time.sleep(0.002)
            if read_pid(str(pidfile)) == old:
                raise RuntimeError(f"{mode}: restart {restarts + 1} did not happen")
            handover_ms.append((time.monotonic() - t) * 1000)
            restarts += 1
            reap()
            time.sleep(args.interval)
        time.sleep(args.warmup)
        stop_file.touch()
        client.wait(timeout=60)
        data = json.loads(out_file.read_text())
        ok, fail = migrate_stats(srv)
        out |= {
            "restarts": restarts,
            "attempts": data["attempts"],
            "ok": data["ok"],
            "failed": sum(data["failures"].values()),
            "failures": data["failures"],
            "connect_p50_ms": percentile(data["connect_ms"], 50),
            "connect_p99_ms": percentile(data["connect_ms"], 99),
            "response_p99_ms": percentile(data["response_ms"], 99),
            "generations_answered": len(data["generations"]),
            "kernel_migrated": ok,
            "kernel_migrate_failed": fail,
            "handover_ms": handover_ms,
        }
        if agent is not None:
            st = agent.status()["kernel"]["reuseport"][GROUP]
            out["program"] = st["counters"]
            out["generations"] = st["generations"]
            out["target_generation"] = st.get("target_generation")
        return out
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(read_pid(str(pidfile)), signal.SIGTERM)
        if service is not None and service.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.wait(timeout=10)
        time.sleep(0.3)  # old generations finish their accepted connections
        reap()
        if agent is not None:
            out["agent_exit"] = agent.stop()


def run_exec(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """gunicorn from PyPI, unchanged, restarted by running ``offloadctl reuseport exec``
    again (what ``systemctl reload`` does with packaging/systemd's example unit)."""
    run = run_server(
        "gunicorn",
        gunicorn_cmd(delay_ms=10),  # 2 workers x 100 requests/s: a queue at each handover
        rate=args.exec_rate,
        http=True,
        clients=1,
        restarts=args.exec_restarts,
        quiet=2.0,
        bins=build(tmp),
    )
    quiet, busy = run.connect_ms(run.quiet_windows), run.connect_ms(run.restart_windows)
    return {
        "mode": "exec",
        "server": "gunicorn",
        "restarts": run.restarts,
        "attempts": len(run.records),
        "failed": sum(run.failures().values()),
        "failures": run.failures(),
        "generations_answered": len({r.answer for r in run.records if r.outcome == "ok"}),
        "connect_p99_quiet_ms": percentile(quiet, 99),
        "connect_p99_restarts_ms": percentile(busy, 99),
        "handover_p50_ms": percentile(run.handover_ms, 50),
        "program": run.counters,
    }


def report_exec(r: dict[str, Any]) -> bool:
    say(
        f"exec: gunicorn restarted {r['restarts']} times by 'offloadctl reuseport exec':"
        f" {r['attempts']} HTTP requests, {r['failed']} failed, answered by"
        f" {r['generations_answered']} generations; connect p99 {r['connect_p99_quiet_ms']:.2f} ms"
        f" quiet vs {r['connect_p99_restarts_ms']:.2f} ms during restarts; handover"
        f" {r['handover_p50_ms']:.0f} ms (p50); program {r['program']}"
    )
    return bool(r["failed"] == 0 and r["generations_answered"] == r["restarts"] + 1)


def report(r: dict[str, Any]) -> None:
    prog = r.get("program")
    moved = (
        f"program migrated {prog['migrated_established']} established +"
        f" {prog['migrated_request']} half-open, dropped {prog['dropped']},"
        f" steered {prog['selected']}"
        if prog
        else "no program"
    )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "none"
    say(
        f"{r['mode']}: {r['attempts']} connections, {r['failed']} failed ({kinds});"
        f" kernel TCPMigrateReqSuccess {r['kernel_migrated']}; {moved};"
        f" {r['restarts']} restarts, {r['generations_answered']} generations answered"
    )
    if r.get("generations") is not None:
        gens = " ".join(
            f"{g['generation']}{'*' if g['target'] else ''}({g['listeners']})"
            for g in r["generations"]
        )
        say(f"agent status: reuseport group {GROUP}: generations {gens} (* = target)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between restarts")
    p.add_argument("--warmup", type=float, default=0.7)
    p.add_argument("--modes", default="agent,none,exec")
    p.add_argument("--exec-rate", type=float, default=160, help="exec: HTTP requests/s")
    p.add_argument("--exec-restarts", type=int, default=5)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("demo_reuseport needs root (namespaces, bpffs)", file=sys.stderr)
        return 1
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    results: list[dict[str, Any]] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="demo-reuseport-") as tmpdir:
        tmp = Path(tmpdir)
        bpffs = tmp / "bpffs"
        bpffs.mkdir()
        subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
        try:
            for mode in args.modes.split(","):
                if mode == "exec":
                    say(
                        f"exec: gunicorn via 'offloadctl reuseport exec', {args.exec_restarts}"
                        f" restarts under {args.exec_rate:.0f} HTTP requests/s"
                    )
                else:
                    label = (
                        "with the agent's program" if mode == "agent" else "baseline, no program"
                    )
                    rate = f"{args.rate:.0f} conn/s"
                    say(f"{mode}: {args.restarts} busy restarts under {rate} ({label})")
                try:
                    r = run_exec(args, tmp) if mode == "exec" else run_mode(mode, args, tmp, bpffs)
                except Exception as exc:  # the summary says what broke
                    r = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
                    say(f"{mode}: FAILED: {r['error']}")
                    ok = False
                else:
                    if mode == "exec":
                        ok = report_exec(r) and ok
                    else:
                        report(r)
                results.append(r)
        finally:
            subprocess.run(["umount", "-l", str(bpffs)], check=False)
    args.out.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: failed connections and connect latency across service restarts.

For each mode, in the same run and with fresh namespaces:

- ``program``: the BPF SELECT_OR_MIGRATE program steers new connections to
  the newest active generation and migrates what is queued on closing
  listeners (examples/reuseport_service.py with ``--group``);
- ``sysctl``:  no program, ``net.ipv4.tcp_migrate_req=1`` (the kernel migrates
  to a random remaining listener);
- ``none``:    neither; queued connections are reset.

A client process in its own namespace (over a veth pair) opens connections at
a steady rate; each sends a line and waits for the answer. Meanwhile the
service is restarted ``--restarts`` times (SIGHUP: generation N+1 starts and
activates, generation N stops accepting, lingers ``--linger-ms`` as a busy
server would, then closes its listeners without accepting).

A connection fails if it is refused or reset or gets no answer within 3 s.
Connect latency is connect() to writable; response latency is connect() to
the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import reuseport_lab  # noqa: E402 - bench/ is the script's directory
from reuseport_lab import (  # noqa: E402
    PORT,
    PR_SET_CHILD_SUBREAPER,
    SERVER_IP,
    migrate_stats,
    percentile,
    read_pid,
    reap,
    sh,
    veth_lab,
    wait_file,
)

from controlplane.kernel.netns import entered  # noqa: E402 - after the sys.path tweak

SERVICE = REPO / "examples" / "reuseport_service.py"
MODES = ("program", "sysctl", "none")
TIMEOUT = 3.0


# --- client (runs as its own process) ------------------------------------------


@dataclass
class Conn:
    sock: socket.socket
    started: float
    connected: float = 0.0
    buf: bytes = b""


@dataclass
class ClientStats:
    attempts: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    connect_ms: list[float] = field(default_factory=list)
    response_ms: list[float] = field(default_factory=list)
    generations: set[int] = field(default_factory=set)

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


def run_client(netns: str, rate: float, stop_file: str) -> ClientStats:
    """Open ``rate`` connections/s until ``stop_file`` exists, then drain."""
    stats = ClientStats()
    sel = selectors.DefaultSelector()
    conns: dict[int, Conn] = {}
    linger = struct.pack("ii", 1, 0)
    with entered(netns):
        t0 = time.monotonic()
        opened = 0
        stopping = False
        last_check = t0
        while not stopping or conns:
            now = time.monotonic()
            if not stopping and now - last_check > 0.05:
                last_check = now
                stopping = os.path.exists(stop_file)
            due = 0 if stopping else int((now - t0) * rate) - opened
            for _ in range(due):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                opened += 1
                stats.attempts += 1
                rc = s.connect_ex((SERVER_IP, PORT))
                if rc not in (0, errno.EINPROGRESS):
                    stats.fail(errno.errorcode.get(rc, str(rc)))
                    s.close()
                    continue
                conns[s.fileno()] = Conn(s, time.monotonic())
                sel.register(s, selectors.EVENT_WRITE)
            for key, _ev in sel.select(timeout=0.0005):
                c = conns[key.fd]
                s = c.sock
                done: str | None = None
                if not c.connected:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        done = errno.errorcode.get(err, str(err))
                    else:
                        c.connected = time.monotonic()
                        stats.connect_ms.append((c.connected - c.started) * 1000)
                        try:
                            s.send(b"ping\n")
                            sel.modify(s, selectors.EVENT_READ)
                        except OSError as exc:
                            done = errno.errorcode.get(exc.errno or 0, "send")
                else:
                    try:
                        chunk = s.recv(256)
                    except OSError as exc:
                        chunk = b""
                        done = errno.errorcode.get(exc.errno or 0, "recv")
                    c.buf += chunk
                    if done is None and b"\n" in c.buf:
                        stats.ok += 1
                        stats.response_ms.append((time.monotonic() - c.started) * 1000)
                        with contextlib.suppress(ValueError):
                            stats.generations.add(int(c.buf.split()[0]))
                        done = "ok"
                    elif done is None and not chunk:
                        done = "closed"
                if done is not None:
                    if done != "ok":
                        stats.fail(done)
                    sel.unregister(s)
                    del conns[key.fd]
                    # RST instead of FIN: no TIME_WAIT, so ports recycle at once.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    s.close()
            if now - t0 > 1:
                for fd, c in list(conns.items()):
                    if now - c.started > TIMEOUT:
                        stats.fail("timeout")
                        sel.unregister(c.sock)
                        c.sock.close()
                        del conns[fd]
    return stats


# --- driver ----------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    stats: ClientStats
    restarts: int
    seconds: float
    migrate_ok: int
    migrate_fail: int
    counters: dict[str, int] | None


def run_mode(mode: str, args: argparse.Namespace, bpffs: str, tmp: str) -> ModeResult:
    with veth_lab("rpb") as (srv, cli):
        return _run_mode(srv, cli, mode, args, bpffs, tmp)


def _run_mode(
    srv: str, cli: str, mode: str, args: argparse.Namespace, bpffs: str, tmp: str
) -> ModeResult:
    try:
        if mode == "sysctl":
            sh("sysctl", "-qw", "net.ipv4.tcp_migrate_req=1", netns=srv)
        group: list[str] = []
        if mode == "program":
            from controlplane.kernel.bpf.loader import load_group

            load_group("bench", netns=srv, bpffs=bpffs)
            group = ["--group", "bench", "--bpffs", bpffs]
        pidfile = os.path.join(tmp, f"{mode}.pid")
        stop_file = os.path.join(tmp, f"{mode}.stop")
        service = subprocess.Popen(
            [
                *(sys.executable, str(SERVICE), "--netns", srv, "--host", SERVER_IP),
                *("--port", str(PORT), "--workers", str(args.workers), "--pidfile", pidfile),
                *("--linger-ms", str(args.linger_ms), "--quiet", *group),
            ]
        )
        wait_file(pidfile)
        out_file = os.path.join(tmp, f"{mode}.json")
        client = subprocess.Popen(
            [
                *(sys.executable, __file__, "--client", cli, "--rate", str(args.rate)),
                *("--stop-file", stop_file, "--out", out_file),
            ]
        )
        started = time.monotonic()
        time.sleep(args.warmup)
        restarts = 0
        for _ in range(args.restarts):
            old = read_pid(pidfile)
            os.kill(old, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while read_pid(pidfile) == old and time.monotonic() < deadline:
                time.sleep(0.005)
            if read_pid(pidfile) == old:
                print(f"{mode}: restart {restarts + 1} did not happen", file=sys.stderr)
                break
            restarts += 1
            reap()
            time.sleep(args.interval)
        time.sleep(args.warmup)
        Path(stop_file).touch()
        client.wait(timeout=30)
        seconds = time.monotonic() - started
        counters = None
        if mode == "program":
            from controlplane.reuseport import ReuseportGroup

            with ReuseportGroup.open("bench", netns=srv, bpffs=bpffs) as g:
                c = g.counters()
            counters = {k: getattr(c, k) for k in c.__dataclass_fields__}
        ok, fail = migrate_stats(srv)
        with contextlib.suppress(ProcessLookupError):
            os.kill(read_pid(pidfile), signal.SIGTERM)
        service.wait(timeout=10) if service.poll() is None else None
        time.sleep(0.3)
        reap()
        data = json.loads(Path(out_file).read_text())
        stats = ClientStats(
            attempts=data["attempts"],
            ok=data["ok"],
            failures=data["failures"],
            connect_ms=data["connect_ms"],
            response_ms=data["response_ms"],
            generations=set(data["generations"]),
        )
        return ModeResult(mode, stats, restarts, seconds, ok, fail, counters)
    finally:
        if mode == "program":
            from controlplane.kernel.bpf.loader import unload_group

            with contextlib.suppress(Exception):
                unload_group("bench", netns=srv, bpffs=bpffs)


def print_table(results: list[ModeResult], args: argparse.Namespace) -> None:
    print(
        f"\nreuseport restarts: {args.restarts} restarts per mode, {args.rate:.0f} conn/s,"
        f" {args.workers} listeners/generation, linger {args.linger_ms} ms\n"
    )
    base = next((r for r in results if r.mode == "none"), None)
    head = (
        f"{'mode':<8} {'attempts':>8} {'failed':>7} {'fail %':>7} {'connect p50':>11}"
        f" {'connect p99':>11} {'resp p99':>9} {'migrated':>9} {'restarts':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        s = r.stats
        failed = sum(s.failures.values())
        print(
            f"{r.mode:<8} {s.attempts:>8} {failed:>7} {100 * failed / max(1, s.attempts):>6.2f}%"
            f" {percentile(s.connect_ms, 50):>9.2f}ms {percentile(s.connect_ms, 99):>9.2f}ms"
            f" {percentile(s.response_ms, 99):>7.1f}ms {r.migrate_ok:>9} {r.restarts:>8}"
        )
    print()
    for r in results:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.stats.failures.items())) or "none"
        extra = f"; program counters: {r.counters}" if r.counters else ""
        print(
            f"{r.mode}: failures by kind: {kinds}; kernel migrate failures {r.migrate_fail}{extra}"
        )
    if base is not None:
        base_failed = sum(base.stats.failures.values())
        for r in results:
            if r is base:
                continue
            failed = sum(r.stats.failures.values())
            ratio = f"{failed / base_failed:.3f}" if base_failed else "n/a"
            p99 = percentile(r.stats.connect_ms, 99) / percentile(base.stats.connect_ms, 99)
            print(f"{r.mode} vs none: failed ratio {ratio}, connect p99 ratio {p99:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--restarts", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.3, help="seconds between restarts")
    p.add_argument("--linger-ms", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=float, default=0.7)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--stop-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    reuseport_lab.add_arguments(p)
    args = p.parse_args()

    if args.client:
        stats = run_client(args.client, args.rate, args.stop_file)
        data = {
            "attempts": stats.attempts,
            "ok": stats.ok,
            "failures": stats.failures,
            "connect_ms": stats.connect_ms,
            "response_ms": stats.response_ms,
            "generations": sorted(stats.generations),
        }
        Path(args.out).write_text(json.dumps(data))
        return 0

    if os.geteuid() != 0:
        print("bench_reuseport needs root (namespaces, bpffs)", file=sys.stderr)
        return 1
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    results: list[ModeResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-reuseport-") as tmp:
        bpffs = os.path.join(tmp, "bpffs")
        os.mkdir(bpffs)
        subprocess.run(["mount", "-t", "bpf", "bpf", bpffs], check=True)
        try:
            for mode in filter(None, args.modes.split(",")):
                print(f"running mode {mode}...", file=sys.stderr, flush=True)
                results.append(run_mode(mode, args, bpffs, tmp))
        finally:
            subprocess.run(["umount", "-l", bpffs], check=False)
    if results:
        print_table(results, args)
    exec_runs = reuseport_lab.run_all(args)
    if exec_runs:
        reuseport_lab.print_rows(exec_runs)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "mode": r.mode,
                        "attempts": r.stats.attempts,
                        "failed": sum(r.stats.failures.values()),
                        "failures": r.stats.failures,
                        "connect_p50_ms": percentile(r.stats.connect_ms, 50),
                        "connect_p99_ms": percentile(r.stats.connect_ms, 99),
                        "response_p99_ms": percentile(r.stats.response_ms, 99),
                        "restarts": r.restarts,
                        "kernel_migrations": r.migrate_ok,
                        "counters": r.counters,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

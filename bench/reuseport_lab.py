"""The reuseport lab (namespaces over veth, helpers) and the ``reuseport exec``
rows of ``make bench``; imported by bench/bench_reuseport.py and the demo.

``offloadctl reuseport exec`` under load:

Two servers, each restarted ``--exec-restarts`` times by running ``exec`` again
(what ``systemctl reload`` does with the documented unit), in one run per
server: a quiet phase, then the restarts ``--exec-gap`` seconds apart:

- ``c-server``: bench/activated_server.c (accept, write, close; forked
  workers) at ``--exec-rate`` new connections/s (the production-load row);
- ``c-server:typer``: the same, each ``exec`` started through the typer
  command (what every start cost before the fast start of cli/exec_cmd.py:
  typer and pydantic imported); the baseline of the row above;
- ``c-server:hup``: the same, each restart a SIGHUP to the running exec
  (``--reload-signal HUP``, what ``ExecReload=/bin/kill -HUP $MAINPID``
  does): it forks the next generation, no new interpreter starts;
- ``gunicorn``: gunicorn from PyPI serving a WSGI app, unchanged (the
  real-server row), at ``--gunicorn-rate`` HTTP requests/s.

Two controls put something else where each restart would be, with no
handover (the server keeps its first generation): ``SERVER:imports`` runs
exec's own imports in a fresh interpreter; ``SERVER:idle`` waits 150 ms.

Before them, the CPU one ``exec`` start costs (``-- /bin/true``: start, open
the group, register, fork CMD, retire, exit), median of ``--startup-runs``,
by each start. The package and the venv are byte-compiled first, as a
deployed offloadctl is (packaging/deb/postinst): a source tree run with
PYTHONDONTWRITEBYTECODE=1 would compile every module at every start.

The load is bench/reuseport_load.c (open loop, one record per connection),
run as ``--clients`` processes from their own namespace over a veth pair.
Both C programs are built here with the system's gcc. A connection counts for
the restarts if it started while one was under way (from the new exec's start
to the old exec's exit), for the quiet phase if it started before, between or
after them: the same client processes, interleaved windows, so the ratio of
their connect latencies compares like with like even while other work comes
and goes on a shared machine. A failed connection is one refused, reset, closed
without an answer or unanswered within 3 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controlplane.core.reuseport_policy import target  # noqa: E402 - after the sys.path tweak
from controlplane.kernel.bpf.loader import load_group, unload_group  # noqa: E402
from controlplane.reuseport import ReuseportGroup  # noqa: E402

SERVER_IP, CLIENT_IP, PORT = "10.99.0.1", "10.99.0.2", 8080
PR_SET_CHILD_SUBREAPER = 36
GROUP = "bench"
OUTCOMES = ("ok", "refused", "reset", "timeout", "closed", "other", "bad-reply")
_REC = struct.Struct("<IIII")  # start_us, connect_us, outcome, answer (reuseport_load.c)


def sh(*args: str, netns: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def veth_lab(prefix: str) -> Iterator[tuple[str, str]]:
    """Server and client namespaces joined by a veth pair (SERVER_IP, CLIENT_IP)."""
    tag = uuid.uuid4().hex[:6]
    srv, cli = f"{prefix}-s-{tag}", f"{prefix}-c-{tag}"
    try:
        for ns in (srv, cli):
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "v-srv", "netns", srv, "type", "veth", "peer", "v-cli",
           "netns", cli)  # fmt: skip
        for ns, dev, ip in ((srv, "v-srv", SERVER_IP), (cli, "v-cli", CLIENT_IP)):
            sh("ip", "addr", "add", f"{ip}/24", "dev", dev, netns=ns)
            sh("ip", "link", "set", dev, "up", netns=ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535", netns=cli)
        yield srv, cli
    finally:
        for ns in (srv, cli):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def migrate_stats(netns: str) -> tuple[int, int]:
    lines = sh("cat", "/proc/net/netstat", netns=netns).splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            d = dict(zip(head.split()[1:], map(int, vals.split()[1:]), strict=False))
            return d.get("TCPMigrateReqSuccess", 0), d.get("TCPMigrateReqFailure", 0)
    return 0, 0


def wait_file(path: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"service did not start ({path} missing)")
        time.sleep(0.01)


def read_pid(path: str) -> int:
    return int(Path(path).read_text())


def reap() -> None:
    # Old generations are reparented to us (subreaper) when their parent exits.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def build(tmp: Path) -> dict[str, Path]:
    """Compile the load generator and the C server (gcc -O2)."""
    out = {}
    for name in ("reuseport_load", "activated_server"):
        binary = tmp / name
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(binary), str(REPO / "bench" / f"{name}.c")],
            check=True,
        )
        out[name] = binary
    return out


@dataclass
class Record:
    start_ms: float
    connect_ms: float
    outcome: str
    answer: int


@dataclass
class ExecRun:
    server: str
    offered_rate: float
    seconds: float
    records: list[Record]
    restarts: int
    # (from, to) in ms since the clients started: each restart from the new exec's
    # start to the old exec's exit; quiet: before the first, between and after them.
    restart_windows: list[tuple[float, float]]
    quiet_windows: list[tuple[float, float]]
    handover_ms: list[float] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # clients, servers and exec processes together
    load: float = 0.0  # the 1-minute load average as the run started (a shared machine)

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            if r.outcome != "ok":
                out[r.outcome] = out.get(r.outcome, 0) + 1
        return out

    def connect_ms(self, windows: list[tuple[float, float]]) -> list[float]:
        return [
            r.connect_ms
            for r in self.records
            if r.outcome == "ok" and any(lo <= r.start_ms < hi for lo, hi in windows)
        ]

    @property
    def achieved_rate(self) -> float:
        return len(self.records) / self.seconds if self.seconds else 0.0


def read_records(path: Path) -> list[Record]:
    return [
        Record(start / 1000, conn / 1000, OUTCOMES[outcome], answer)
        for start, conn, outcome, answer in _REC.iter_unpack(path.read_bytes())
    ]


# What runs in each restart window of a control row instead of a restart.
CONTROLS = {
    "imports": [sys.executable, "-c", "import controlplane.agent.reuseport_exec"],
    "idle": ["sleep", "0.15"],
}
# The typer command of 'reuseport exec', as offloadctl's main() ran it before
# the fast start: pydantic's plugins off, then typer parses and runs it.
TYPER_START = (
    "import os; os.environ.setdefault('PYDANTIC_DISABLE_PLUGINS', '__all__');"
    " from controlplane.cli.common import app; app(prog_name='offloadctl')"
)


def exec_argv(start: str, srv: str, bpffs: str, cmd: list[str]) -> list[str]:
    """``offloadctl reuseport exec`` of the group in ``srv``, by ``start``:
    "fast" (the installed script), "typer" (the typer command) or "hup" (the
    installed script, restarted by SIGHUP)."""
    reload = ["--reload-signal", "HUP"] if start == "hup" else []
    offloadctl = shutil.which("offloadctl", path=os.path.dirname(sys.executable))
    if start == "typer":
        argv = [sys.executable, "-c", TYPER_START]
    else:
        argv = [offloadctl] if offloadctl else [sys.executable, "-m", "controlplane.cli"]
    return [
        *argv, "reuseport", "exec", "--name", GROUP, "--netns", srv, "--bpffs", bpffs,
        "--listen", f"{SERVER_IP}:{PORT}", *reload, "--", *cmd,
    ]  # fmt: skip


class Proc(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...


class Forked:
    """A generation a reload forked: reparented to us (subreaper) once its parent exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # still its parent's child
                return None
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout or 3600)
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 3600)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


class ExecProc:
    def __init__(self, argv: list[str], log: Path, *, pid: int = 0) -> None:
        self.proc: Proc
        if pid:
            self.proc = Forked(pid)
            return
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=REPO)


def forked_pid(log: Path, parent: int) -> int:
    """The pid generation ``parent``'s exec forked for a reload, from its log."""
    found = re.findall(rf"exec\[{GROUP}/{parent}\]: reload: pid ([0-9]+) starts", log.read_text())
    if not found:
        raise RuntimeError(f"generation {parent} logged no reload")
    return int(found[-1])


def wait_generation(group: ReuseportGroup, gen: int, ex: ExecProc, timeout: float = 60) -> None:
    """Until ``gen`` is the target; polled every 20 ms (the bench's CPU is the load's)."""
    deadline = time.monotonic() + timeout
    while target(group.state()).generation != gen:
        if ex.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"generation {gen} did not become active")
        time.sleep(0.02)


def run_server(
    server: str,
    cmd: list[str],
    *,
    start: str = "fast",
    rate: float,
    http: bool,
    clients: int,
    restarts: int,
    quiet: float,
    gap: float = 0.0,
    bins: dict[str, Path],
) -> ExecRun:
    """One server under load: ``quiet`` seconds, then ``restarts`` restarts ``gap``
    seconds apart, then a second's tail. Quiet and restart windows interleave, so
    that a shared machine's other load falls on both alike."""
    load = os.getloadavg()[0]
    with veth_lab("rpx") as (srv, cli), _bpffs() as bpffs:
        tmp = Path(bpffs).parent
        load_group(GROUP, netns=srv, bpffs=bpffs)
        group = ReuseportGroup.open(GROUP, netns=srv, bpffs=bpffs)
        log = tmp / "exec.log"
        execs = [ExecProc(exec_argv(start, srv, bpffs, cmd), log)]
        outs = [tmp / f"{server}-{i}.bin" for i in range(clients)]
        loads: list[subprocess.Popen[bytes]] = []
        try:
            wait_generation(group, 1, execs[0])
            # Stopped by SIGINT once the restarts are done; this is only a bound.
            seconds = 3600
            t0 = time.monotonic()
            for out in outs:
                loads.append(
                    subprocess.Popen(
                        [
                            "ip", "netns", "exec", cli, str(bins["reuseport_load"]),
                            "-a", SERVER_IP, "-p", str(PORT), "-r", str(rate / clients),
                            "-d", str(seconds), "-o", str(out), *(["-H"] if http else []),
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                )  # fmt: skip
            time.sleep(quiet)

            def ms() -> float:
                return (time.monotonic() - t0) * 1000

            quiet_windows: list[tuple[float, float]] = []
            restart_windows: list[tuple[float, float]] = []
            handover = []
            calm = 1000.0  # the first second is warm-up
            for gen in range(2, restarts + 2):
                if gen > 2:
                    time.sleep(gap)
                t = time.monotonic()
                quiet_windows.append((calm, ms()))
                if start in CONTROLS:
                    subprocess.run(CONTROLS[start], check=True, cwd=REPO)
                    handover.append((time.monotonic() - t) * 1000)
                elif start == "hup":
                    execs[-1].proc.send_signal(signal.SIGHUP)
                    wait_generation(group, gen, execs[-1])
                    handover.append((time.monotonic() - t) * 1000)
                    execs.append(ExecProc([], log, pid=forked_pid(log, gen - 1)))
                    if execs[-2].proc.wait(60) != 0:
                        raise RuntimeError(f"exec of generation {gen - 1} exited non-zero")
                else:
                    execs.append(ExecProc(exec_argv(start, srv, bpffs, cmd), log))
                    wait_generation(group, gen, execs[-1])
                    handover.append((time.monotonic() - t) * 1000)
                    if execs[-2].proc.wait(60) != 0:
                        raise RuntimeError(f"exec of generation {gen - 1} exited non-zero")
                calm = ms()
                restart_windows.append(((t - t0) * 1000, calm))
            time.sleep(1.0)  # let the last handover's stragglers finish inside the run
            quiet_windows.append((calm, calm + 500))
            for p in loads:
                p.send_signal(signal.SIGINT)
            for p in loads:
                p.wait(30)
            elapsed = time.monotonic() - t0
            c = group.counters()
            records = [r for out in outs if out.exists() for r in read_records(out)]
            return ExecRun(
                server=server,
                offered_rate=rate,
                seconds=elapsed,
                records=records,
                restarts=restarts,
                restart_windows=restart_windows,
                quiet_windows=quiet_windows,
                handover_ms=handover,
                counters={k: getattr(c, k) for k in c.__dataclass_fields__},
                load=load,
            )
        finally:
            for p in loads:
                if p.poll() is None:
                    p.kill()
            for ex in execs:
                if ex.proc.poll() is None:
                    ex.proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        ex.proc.wait(20)
            group.close()
            with contextlib.suppress(Exception):
                unload_group(GROUP, netns=srv, bpffs=bpffs)


@contextlib.contextmanager
def _bpffs() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-rpx-") as tmp:
        path = os.path.join(tmp, "bpffs")
        os.mkdir(path)
        subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", path], check=False)


def print_rows(runs: list[ExecRun]) -> None:
    load = os.getloadavg()
    print(
        f"\nreuseport exec: {runs[0].restarts if runs else 0} restarts per server by running"
        f" 'offloadctl reuseport exec' again (SERVER:hup: by SIGHUP to the running exec,"
        f" which forks the next generation); load average {load[0]:.1f} on"
        f" {os.cpu_count()} CPUs (shared machine; 'load': as the run started)\n"
    )
    head = (
        f"{'server':<14} {'load':>4} {'offered/s':>9} {'achieved/s':>10} {'conns':>7}"
        f" {'failed':>6}"
        f" {'quiet p50':>9} {'quiet p99':>9} {'restart p50':>11} {'restart p99':>11}"
        f" {'p99 ratio':>9} {'migrated':>8} {'handover p50':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        quiet, busy = r.connect_ms(r.quiet_windows), r.connect_ms(r.restart_windows)
        ratio = percentile(busy, 99) / percentile(quiet, 99)
        migrated = r.counters.get("migrated_established", 0) + r.counters.get("migrated_request", 0)
        print(
            f"{r.server:<14} {r.load:>4.1f} {r.offered_rate:>9.0f} {r.achieved_rate:>10.0f}"
            f" {len(r.records):>7} {sum(r.failures().values()):>6}"
            f" {percentile(quiet, 50):>7.2f}ms {percentile(quiet, 99):>7.2f}ms"
            f" {percentile(busy, 50):>9.2f}ms {percentile(busy, 99):>9.2f}ms"
            f" {ratio:>9.2f} {migrated:>8} {percentile(r.handover_ms, 50):>10.0f}ms"
        )
    print()
    cpus = os.cpu_count() or 1
    for r in runs:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.failures().items())) or "none"
        answered = len({rec.answer for rec in r.records if rec.outcome == "ok"})
        per_conn = r.cpu_seconds / max(1, len(r.records))
        print(
            f"{r.server}: failures {kinds}; {answered} generations answered;"
            f" program counters {r.counters}"
        )
        print(
            f"{r.server}: {per_conn * 1e6:.0f} us of CPU per connection (load generator,"
            f" server, exec; {r.cpu_seconds:.1f} s in all): {cpus} idle CPUs would carry about"
            f" {cpus / per_conn:,.0f} connections/s"
            if per_conn
            else f"{r.server}: no CPU data"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exec-servers",
        default="c-server,c-server:typer,gunicorn",
        help="servers restarted by 'reuseport exec' ('' to skip); SERVER:typer starts each"
        " exec through the typer command (the baseline of the fast start); SERVER:hup"
        " restarts by SIGHUP to the running exec (--reload-signal); SERVER:imports"
        " and SERVER:idle are controls without restarts",
    )
    p.add_argument(
        "--startup-runs", type=int, default=10, help="exec start-up CPU samples (0 to skip)"
    )
    p.add_argument("--exec-rate", type=float, default=10000, help="c-server: connections/s")
    p.add_argument("--gunicorn-rate", type=float, default=300, help="gunicorn: requests/s")
    p.add_argument("--exec-restarts", type=int, default=20)
    p.add_argument("--clients", type=int, default=4, help="load generator processes")
    p.add_argument("--server-workers", type=int, default=2, help="c-server worker processes")
    p.add_argument("--quiet", type=float, default=3.0, help="seconds before the first restart")
    p.add_argument("--exec-gap", type=float, default=0.5, help="quiet seconds between two restarts")


def gunicorn_cmd(delay_ms: int = 0) -> list[str]:
    """gunicorn from this venv serving examples/wsgi_generation.py, unchanged; a
    request takes ``delay_ms`` (so that requests queue on the listeners)."""
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    if gunicorn is None:
        raise SystemExit("gunicorn is not installed in this venv (a dev dependency)")
    return [
        *("env", f"WSGI_DELAY_MS={delay_ms}"),  # env execs gunicorn: LISTEN_PID holds
        *(gunicorn, "--workers", "2", "--no-control-socket", "--log-level", "warning"),
        *("--chdir", str(REPO / "examples"), "wsgi_generation:app"),
    ]


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def byte_compile() -> None:
    """Byte-compile the package and the venv, as the Debian package's postinst does."""
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", str(REPO / "controlplane"), purelib],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def startup_cpu(starts: tuple[str, ...], runs: int) -> dict[str, float]:
    """Median CPU (ms, user + system) of one ``exec ... -- /bin/true`` by each start."""
    import statistics

    out: dict[str, list[float]] = {start: [] for start in starts}
    with veth_lab("rps") as (srv, _cli), _bpffs() as bpffs:
        load_group(GROUP, netns=srv, bpffs=bpffs)
        try:
            for _ in range(runs):
                for start in starts:  # interleaved: both see the same machine
                    proc = subprocess.Popen(
                        exec_argv(start, srv, bpffs, ["/bin/true"]),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        cwd=REPO,
                    )
                    _pid, status, ru = os.wait4(proc.pid, 0)
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    if proc.returncode != 0:
                        raise RuntimeError(f"exec ({start}) -- /bin/true exited {proc.returncode}")
                    out[start].append((ru.ru_utime + ru.ru_stime) * 1000)
        finally:
            unload_group(GROUP, netns=srv, bpffs=bpffs)
    return {start: statistics.median(ms) for start, ms in out.items()}


def print_startup(cpu: dict[str, float], runs: int) -> None:
    load = os.getloadavg()[0]
    print(f"\nreuseport exec start-up CPU (-- /bin/true; median of {runs}; load {load:.1f})")
    for start, ms in cpu.items():
        ratio = f"  ({ms / cpu['typer']:.2f} of typer)" if "typer" in cpu else ""
        print(f"  {start + ' start':<12} {ms:7.1f} ms{ratio}")


def run_all(args: argparse.Namespace) -> list[ExecRun]:
    import tempfile

    servers = [s for s in args.exec_servers.split(",") if s]
    runs: list[ExecRun] = []
    if servers or args.startup_runs:
        byte_compile()
    if args.startup_runs:
        print("measuring exec start-up CPU...", file=sys.stderr, flush=True)
        print_startup(startup_cpu(("fast", "typer"), args.startup_runs), args.startup_runs)
    with tempfile.TemporaryDirectory(prefix="bench-rpx-bin-") as tmp:
        bins = build(Path(tmp)) if servers else {}
        for label in servers:
            server, _, start = label.partition(":")
            print(f"running reuseport exec with {label}...", file=sys.stderr, flush=True)
            cpu0 = _children_cpu()
            common = {
                "start": start or "fast",
                "clients": args.clients,
                "restarts": args.exec_restarts,
                "quiet": args.quiet,
                "gap": args.exec_gap,
                "bins": bins,
            }
            if server == "c-server":
                cmd = [str(bins["activated_server"]), str(args.server_workers)]
                runs.append(run_server(label, cmd, rate=args.exec_rate, http=False, **common))
            elif server == "gunicorn":
                runs.append(
                    run_server(label, gunicorn_cmd(), rate=args.gunicorn_rate, http=True, **common)
                )
            else:
                raise SystemExit(f"--exec-servers: unknown server {server!r}")
            # Every process of the run has been waited for: its CPU time is counted.
            runs[-1].cpu_seconds = _children_cpu() - cpu0
    return runs

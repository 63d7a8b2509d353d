"""``offloadctl reuseport exec`` against the real kernel: socket activation, the
handover between two ``exec`` processes, and gunicorn (a server from PyPI that
speaks LISTEN_FDS and sd_notify, unchanged) restarted 20 times under load."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.kernel.bpf.loader import load_group
from controlplane.kernel.netns import entered
from controlplane.reuseport import GroupStatus, ReuseportGroup
from tests.netns import test_reuseport_support as sup

REPO = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("activated_server.py")
GROUP = "web"


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


class Exec:
    """One ``offloadctl reuseport exec`` process (one generation)."""

    def __init__(
        self, netns: str, bpffs: str, log: Path, cmd: list[str], *extra: str, listen: str = ""
    ) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "controlplane.cli", "reuseport", "exec"),
                    *("--name", GROUP, "--netns", netns, "--bpffs", bpffs),
                    *("--listen", listen or f"127.0.0.1:{sup.PORT}", *extra, "--", *cmd),
                ],
                stdout=out,
                stderr=out,
                cwd=REPO,
            )

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"exec did not exit; its log:\n{self.log.read_text()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def status(netns: str, bpffs: str) -> GroupStatus:
    with ReuseportGroup.open(GROUP, netns=netns, bpffs=bpffs) as g:
        return g.status()


def wait_target(netns: str, bpffs: str, generation: int, ex: Exec, timeout: float = 20) -> None:
    def reached() -> bool:
        if ex.proc.poll() is not None:
            raise AssertionError(f"exec exited {ex.proc.returncode}:\n{ex.log.read_text()}")
        return status(netns, bpffs).target_generation == generation

    sup.wait_for(f"generation {generation} to be the target", reached, timeout)


def test_cmd_gets_its_listeners_by_socket_activation(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    load_group(GROUP, netns=netns, bpffs=bpffs)
    report = tmp_path / "report.json"
    ex = Exec(
        netns,
        bpffs,
        tmp_path / "exec.log",
        [sys.executable, str(SERVER), "--mode", "hold", "--report", str(report)],
        "--listen",
        f"v6=[::1]:{sup.PORT}",
        listen=f"v4=127.0.0.1:{sup.PORT}",
    )
    try:
        wait_target(netns, bpffs, 1, ex)
        got = json.loads(report.read_text())
        assert got["env"] == {
            "LISTEN_FDS": "2",
            "LISTEN_PID": str(got["pid"]),
            "LISTEN_FDNAMES": "v4:v6",
            "OFFLOADCTL_REUSEPORT_GENERATION": "1",
        }
        assert got["sockets"] == [
            [socket.AF_INET, sup.PORT, 1],
            [socket.AF_INET6, sup.PORT, 1],
        ]
        assert got["fd_after_listeners_open"] is False  # nothing else leaked into CMD
        st = status(netns, bpffs)
        assert [(g.generation, len(g.slots), g.target) for g in st.generations] == [(1, 2, True)]
        # Signals reach CMD; its status (killed by SIGTERM: 128+15) is exec's.
        ex.proc.send_signal(signal.SIGTERM)
        assert ex.wait() == 128 + signal.SIGTERM
        assert status(netns, bpffs).generations == ()  # retired on the way out
    finally:
        ex.kill()


def test_ready_after_activates_a_server_that_never_says_ready(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    load_group(GROUP, netns=netns, bpffs=bpffs)
    ex = Exec(netns, bpffs, tmp_path / "exec.log", ["sleep", "60"], "--ready-after", "0.3")
    try:
        wait_target(netns, bpffs, 1, ex)
        assert "starting -> serving (ready-delay-passed)" in ex.log.read_text()
    finally:
        ex.kill()


def test_exec_runs_without_importing_typer_or_pydantic(
    netns: str, bpffs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restart's start-up CPU competes with the server it restarts (README,
    # "Performance"): exec's own path imports no CLI framework. The import log
    # (-X importtime, inherited by a CMD that is not Python) is exec's alone.
    load_group(GROUP, netns=netns, bpffs=bpffs)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    ex = Exec(netns, bpffs, tmp_path / "exec.log", ["sleep", "60"], "--ready-after", "0")
    try:
        wait_target(netns, bpffs, 1, ex)
        ex.proc.send_signal(signal.SIGTERM)
        assert ex.wait() == 128 + signal.SIGTERM
        log = ex.log.read_text().splitlines()
        imported = {
            line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in log
            if line.startswith("import time:") and "|" in line
        }
        assert {"controlplane", "socket", "selectors"} <= imported  # the log is there
        assert not imported & {"typer", "click", "pydantic", "pydantic_core", "rich", "yaml"}
    finally:
        ex.kill()


def test_a_cmd_that_never_gets_ready_leaves_the_old_generation_serving(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    load_group(GROUP, netns=netns, bpffs=bpffs)
    serve = [sys.executable, str(SERVER), "--mode", "serve"]
    old = Exec(netns, bpffs, tmp_path / "old.log", serve)
    new = None
    try:
        wait_target(netns, bpffs, 1, old)
        # 'sleep' never says READY=1: after --ready-timeout generation 2 gives up.
        new = Exec(netns, bpffs, tmp_path / "new.log", ["sleep", "60"], "--ready-timeout", "0.5")
        assert new.wait() == 1
        assert "starting -> aborting (ready-timed-out)" in new.log.read_text()
        st = status(netns, bpffs)
        assert [(g.generation, g.target) for g in st.generations] == [(1, True)]
        assert old.proc.poll() is None
        clients = sup.open_clients(netns, socket.AF_INET, 5, fastopen=False)
        assert sorted(sup.collect(clients, timeout=5).served) == [
            b"new:" + sup.payload(i) for i in range(5)
        ]
    finally:
        for ex in (old, new):
            if ex is not None:
                ex.kill()


class HttpLoad:
    """``clients`` threads sending HTTP/1.0 requests back to back until stopped."""

    def __init__(self, netns: str, clients: int) -> None:
        self.netns = netns
        self.stop = threading.Event()
        self.answers: dict[int, int] = {}
        self.attempts = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    def run(self) -> None:
        with entered(self.netns):
            while not self.stop.is_set():
                with self.lock:
                    self.attempts += 1
                try:
                    with socket.create_connection(("127.0.0.1", sup.PORT), timeout=5) as c:
                        c.sendall(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
                        data = b""
                        while chunk := c.recv(4096):
                            data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                        raise ValueError(f"unexpected answer {data[:80]!r}")
                    gen = int(body)
                    with self.lock:
                        self.answers[gen] = self.answers.get(gen, 0) + 1
                except (OSError, ValueError) as exc:
                    with self.lock:
                        self.failures.append(repr(exc))

    def wait_served(self, generation: int, n: int = 5) -> None:
        sup.wait_for(
            f"generation {generation} to answer {n} requests",
            lambda: self.answers.get(generation, 0) >= n or bool(self.failures),
            timeout=20,
        )
        assert self.failures == []


RESTARTS = 20


def st_line(netns: str, bpffs: str) -> str:
    return f"counters {status(netns, bpffs).counters}"


def assert_every_request_answered(load: HttpLoad, netns: str, bpffs: str, last: int) -> None:
    """Generations 1..last each answered, none failed, the last one alone remains."""
    print(f"{load.attempts} requests, per generation {load.answers}, {st_line(netns, bpffs)}")
    assert load.failures == []
    assert sum(load.answers.values()) == load.attempts  # every request answered
    assert sorted(load.answers) == list(range(1, last + 1))
    st = status(netns, bpffs)
    assert [(g.generation, g.target) for g in st.generations] == [(last, True)]
    assert (st.counters.dropped, st.counters.fallback) == (0, 0)
    assert st.counters.migrated > 0, "no handover had a queue: the test proved nothing"


def test_gunicorn_restarted_20_times_under_load_without_a_reset(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn is not None, "gunicorn is a dev dependency (pip install gunicorn)"
    load_group(GROUP, netns=netns, bpffs=bpffs)
    cmd = [
        *("env", "WSGI_DELAY_MS=20"),  # env execs gunicorn: same pid, LISTEN_PID holds
        *(gunicorn, "--workers", "2", "--graceful-timeout", "10", "--no-control-socket"),
        *("--chdir", str(REPO / "examples"), "wsgi_generation:app"),
    ]
    execs = [Exec(netns, bpffs, tmp_path / "exec-1.log", cmd)]
    # 8 clients, 2 workers taking 20 ms a request: a queue is always waiting on the
    # listeners, so every handover has accepted-by-the-kernel connections to migrate.
    load = HttpLoad(netns, clients=8)
    try:
        wait_target(netns, bpffs, 1, execs[0])
        load.start()
        load.wait_served(1)
        for gen in range(2, RESTARTS + 2):
            new = Exec(netns, bpffs, tmp_path / f"exec-{gen}.log", cmd)
            execs.append(new)
            wait_target(netns, bpffs, gen, new)
            # The previous exec retires, stops gunicorn and exits with its status.
            assert execs[-2].wait() == 0, execs[-2].log.read_text()
            load.wait_served(gen)
        load.stop.set()
        load.join(timeout=10)
        assert_every_request_answered(load, netns, bpffs, RESTARTS + 1)
        execs[-1].proc.send_signal(signal.SIGTERM)
        assert execs[-1].wait() == 0  # gunicorn's own status after a graceful stop
    finally:
        load.stop.set()
        for ex in execs:
            with contextlib.suppress(ProcessLookupError):
                ex.kill()


class FakeSystemd:
    """The manager's side of sd_notify: a datagram socket that keeps what it hears."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0)
        self.heard: list[str] = []

    def drain(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.heard.append(self.sock.recv(4096).decode())
        return self.heard


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_reload_with_detach_reports_the_new_main_pid(
    netns: str, bpffs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synchronous reload of the example unit's comment: ExecReload=exec --detach."""
    load_group(GROUP, netns=netns, bpffs=bpffs)
    manager = FakeSystemd(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(manager.path))
    serve = [sys.executable, str(SERVER), "--mode", "serve"]
    main = Exec(netns, bpffs, tmp_path / "main.log", serve)
    try:
        wait_target(netns, bpffs, 1, main)
        sup.wait_for("READY=1 from generation 1", lambda: len(manager.drain()) >= 2, 15)
        assert manager.heard[:2] == ["STATUS=serving", "READY=1\nSTATUS=generation 1"]

        # Files, not pipes: the detached generation keeps stdout and stderr (under
        # systemd: the journal), so a pipe would never reach EOF.
        out, err = tmp_path / "reload.out", tmp_path / "reload.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            reload = subprocess.run(
                [
                    *(sys.executable, "-m", "controlplane.cli", "reuseport", "exec", "--detach"),
                    *("--name", GROUP, "--netns", netns, "--bpffs", bpffs),
                    *("--listen", f"127.0.0.1:{sup.PORT}", "--", *serve),
                ],
                stdout=o,
                stderr=e,
                timeout=60,
                cwd=REPO,
            )
        assert reload.returncode == 0, err.read_text()
        assert out.read_text() == f"generation 2 of group {GROUP!r} active\n"
        assert status(netns, bpffs).target_generation == 2
        # The old generation handed over and exited with its server's status (this
        # server has no SIGTERM handler: killed by the signal, as a shell says it).
        assert main.wait() == 128 + signal.SIGTERM
        sup.wait_for(
            "MAINPID from generation 2", lambda: any("MAINPID" in m for m in manager.drain()), 15
        )
        takeover = next(m for m in manager.heard if "MAINPID" in m).split("\n")
        detached = int(takeover[0].removeprefix("MAINPID="))
        assert takeover[1:] == ["READY=1", "STATUS=generation 2"]
        assert pid_alive(detached)
        clients = sup.open_clients(netns, socket.AF_INET, 5, fastopen=False)
        assert len(sup.collect(clients, timeout=5).served) == 5
    finally:
        main.kill()
        # Whatever announced itself as the main pid is not our child: stop it by pid.
        for msg in manager.drain():
            if msg.startswith("MAINPID="):
                detached = int(msg.split("\n")[0].removeprefix("MAINPID="))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(detached, signal.SIGTERM)
                sup.wait_for(
                    "the detached generation to exit",
                    lambda pid=detached: not pid_alive(pid),
                    10,
                )

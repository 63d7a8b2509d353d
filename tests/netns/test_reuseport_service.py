"""examples/reuseport_service.py restarts itself under load without a reset."""

from __future__ import annotations

import contextlib
import os
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
from controlplane.reuseport import ReuseportGroup
from tests.netns import test_reuseport_support as sup

SERVICE = Path(__file__).resolve().parents[2] / "examples" / "reuseport_service.py"


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


class Load(threading.Thread):
    """One connection after another until stopped; counts answers per generation."""

    def __init__(self, netns: str) -> None:
        super().__init__(daemon=True)
        self.netns = netns
        self.stop = threading.Event()
        self.generations: dict[int, int] = {}
        self.failures: list[str] = []

    def wait_served(self, generation: int, n: int = 20) -> None:
        """Until ``generation`` answered ``n`` connections (restarts happen under load)."""
        sup.wait_for(
            f"generation {generation} to answer {n} connections",
            lambda: self.generations.get(generation, 0) >= n or bool(self.failures),
            timeout=10,
        )
        assert self.failures == []

    def run(self) -> None:
        with entered(self.netns):
            while not self.stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", sup.PORT), timeout=3) as c:
                        c.sendall(b"hi\n")
                        answer = c.recv(64)
                    gen = int(answer.split()[0])
                    self.generations[gen] = self.generations.get(gen, 0) + 1
                except (OSError, ValueError, IndexError) as exc:
                    self.failures.append(repr(exc))


def read_pid(path: Path) -> int:
    return int(path.read_text())


def test_example_service_restarts_without_resets(netns: str, bpffs: str, tmp_path: Path) -> None:
    load_group("demo", netns=netns, bpffs=bpffs)
    pidfile = tmp_path / "svc.pid"
    svc = subprocess.Popen(
        [
            *(sys.executable, str(SERVICE), "--netns", netns, "--host", "127.0.0.1"),
            *("--port", str(sup.PORT), "--group", "demo", "--bpffs", bpffs),
            *("--pidfile", str(pidfile), "--linger-ms", "30", "--quiet"),
        ]
    )
    pids: list[int] = []
    try:
        sup.wait_for("service start", pidfile.exists, timeout=10)
        load = Load(netns)
        load.start()
        for gen in (1, 2, 3):
            load.wait_served(gen)
            old = read_pid(pidfile)
            pids.append(old)
            os.kill(old, signal.SIGHUP)
            sup.wait_for("the next generation", lambda o=old: read_pid(pidfile) != o, timeout=10)
        load.wait_served(4)
        load.stop.set()
        load.join(timeout=5)
        # Each old generation retires itself before it exits.
        sup.wait_for("old generations to exit", lambda: not any(alive(p) for p in pids), 10)
        pids.append(read_pid(pidfile))

        assert load.failures == []
        assert sorted(load.generations) == [1, 2, 3, 4]
        with ReuseportGroup.open("demo", netns=netns, bpffs=bpffs) as g:
            st = g.status()
        assert st.target_generation == 4
        # Old generations retired themselves: only generation 4 is left.
        assert [(gen.generation, len(gen.slots)) for gen in st.generations] == [(4, 2)]
        assert st.counters.selected == sum(load.generations.values())
        assert (st.counters.dropped, st.counters.fallback) == (0, 0)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        svc.wait(timeout=10)
        # Later generations are not our children: wait for them by pid.
        sup.wait_for("all generations to exit", lambda: not any(alive(p) for p in pids), 10)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"

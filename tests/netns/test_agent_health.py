"""The agent's /healthz and /readyz against a real agent in a namespace.

The loop is stalled the way a real one stalls: the test holds the namespace's
apply lock (the flock every offloadctl apply takes) and asks for a reload, so
the loop waits inside the apply while the exporter thread keeps serving.
"""

from __future__ import annotations

import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane.service.lock import NetnsLock
from tests.netns.conftest import sh
from tests.netns.test_agent import (
    NAT,
    AgentProc,
    agents,
    make_agent,
    router,
    rundir,
    wait_for,
)

__all__ = ["agents", "make_agent", "router", "rundir"]  # fixtures, imported for pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_stalled_loop_is_unhealthy_while_metrics_still_answer(
    make_agent: Callable[..., AgentProc], router: str
) -> None:
    port = free_port()
    a = make_agent(NAT, "--metrics", f"127.0.0.1:{port}", "--health-stale-after", "1")
    a.start()
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ok\n")
    with NetnsLock(router):
        a.signal(signal.SIGHUP)  # the reload's apply now waits for our lock
        wait_for(lambda: get(port, "/healthz")[0] == 503, "/healthz to see the stall")
        body = get(port, "/healthz")[1]
        assert "main loop stalled" in body, body
        assert get(port, "/readyz")[0] == 503
        # The exporter thread is fine: what the old liveness probe read says nothing.
        assert get(port, "/metrics")[0] == 200
    wait_for(lambda: get(port, "/healthz")[0] == 200, "/healthz after the lock is released")
    assert get(port, "/readyz") == (200, "ok\n")
    a.signal(signal.SIGTERM)
    assert a.wait() == 0


def test_not_ready_while_the_owned_table_is_gone(
    make_agent: Callable[..., AgentProc], router: str
) -> None:
    port = free_port()
    a = make_agent(NAT, "--metrics", f"127.0.0.1:{port}")
    a.start()
    assert get(port, "/readyz") == (200, "ok\n")
    sh("nft", "delete", "table", "inet", "offloadctl", netns=router)
    assert a.call("status").ok  # a status request refreshes the agent's view of the table
    status, body = get(port, "/readyz")
    assert (status, body) == (503, "table inet offloadctl absent in the latest kernel view\n")
    assert get(port, "/healthz") == (200, "ok\n")  # alive: not a reason to restart it
    assert a.call("reload").ok  # the reload restores the table
    assert get(port, "/readyz") == (200, "ok\n")


def test_the_loop_pings_the_systemd_watchdog_and_a_stall_stops_it(
    make_agent: Callable[..., AgentProc], router: str, rundir: Path
) -> None:
    notify_path = rundir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(20)

        def message() -> str:
            return sock.recv(4096).decode()

        a = make_agent(NAT)
        # WatchdogSec=1s: systemd asks for a ping every 0.5 s
        a.env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
        a.start(wait=False)
        assert message().startswith("READY=1")
        assert [message(), message()] == ["WATCHDOG=1", "WATCHDOG=1"]
        with NetnsLock(router):
            a.signal(signal.SIGHUP)  # the reload's apply waits for our lock
            while (m := message()) == "WATCHDOG=1":
                pass  # pings sent before the loop read the signal
            assert m.startswith("RELOADING=1")
            sock.settimeout(2.0)  # four periods: a running loop would have pinged
            with pytest.raises(TimeoutError):
                sock.recv(4096)
            sock.settimeout(20)
        assert message().startswith("READY=1")
        assert message() == "WATCHDOG=1"
        a.signal(signal.SIGTERM)
        assert a.wait() == 0

"""The agent's /healthz and /readyz against a real agent in a namespace.

The loop is stalled the way a real one stalls: the test holds the namespace's
apply lock (the flock every offloadctl apply takes) and asks for a reload, so
the loop waits inside the apply while the exporter thread keeps serving.
"""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

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

"""Issue 15 against the real agent process: no input stops it or hangs it
(F7-F10), its state cannot be redirected through a shared directory (F11), and
a bad ``--netns`` creates nothing before it is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.netns.test_agent import (
    AgentProc,
    agents,
    make_agent,
    router,
    run,
    rundir,
    table,
)
from tests.unit.test_agent_properties import hostile_lines

__all__ = ["agents", "make_agent", "router", "rundir"]  # fixtures, imported for pytest

# F8: each line ended the agent with exit 70 (or, the last two, was accepted).
HOSTILE_LINES = {
    "5,000-digit version": b'{"v":1' + b"0" * 5000 + b"}",
    "5,000-digit limit": b'{"v":1,"op":"flows","limit":' + b"9" * 5000 + b"}",
    "30,000 nested [": b"[" * 30000,
    "duplicate op": b'{"v":1,"op":"status","op":"reload"}',
    "version 1.0": b'{"v":1.0,"op":"reload"}',
}


def _exchange(path: Path, line: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert isinstance(reply, dict)
    return reply


def test_hostile_control_lines_are_answered_and_the_agent_stays(
    make_agent: Callable[..., AgentProc],
) -> None:
    a = make_agent().start()
    for name, line in HOSTILE_LINES.items():
        reply = _exchange(a.socket, line)
        error = reply["error"]
        assert reply["ok"] is False and isinstance(error, dict), (name, reply)
        assert error["code"] in ("bad_request", "unsupported_version"), (name, reply)
        assert a.call("status").ok, name  # still serving, after each
    reloads = a.call("status").result["reloads"]
    assert not reloads, reloads  # neither the duplicate op nor v 1.0 ran a reload
    assert a.proc is not None and a.proc.poll() is None
    assert "Traceback" not in a.log()


def test_the_real_agent_answers_random_lines_and_exits_only_by_its_signal(
    make_agent: Callable[..., AgentProc],
) -> None:
    """The property of tests/unit/test_agent_properties.py against the process:
    one agent takes every example, answers each line and the status after it,
    and ends only through the SIGTERM at the end."""
    a = make_agent().start()

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(lines=st.lists(hostile_lines(), min_size=1, max_size=3))
    def each(lines: list[bytes]) -> None:
        for line in lines:
            if line.strip():
                assert isinstance(_exchange(a.socket, line).get("ok"), bool), line[:80]
            assert a.call("status", timeout=15).ok
        assert a.proc is not None and a.proc.poll() is None, a.log()

    each()
    a.signal(signal.SIGTERM)
    assert a.wait(timeout=20) == 0 and "Traceback" not in a.log()


def test_config_replaced_by_a_fifo_never_blocks_the_agent(
    make_agent: Callable[..., AgentProc], router: str
) -> None:
    """F7: reading a config that became a FIFO froze the agent in open()."""
    a = make_agent().start()
    before = table(router)
    fifo = a.config.with_suffix(".fifo")
    os.mkfifo(fifo)
    fifo.replace(a.config)
    reply = a.call("reload", timeout=15)  # the agent's file poll sees it too
    assert not reply.ok and "FIFO" in json.dumps(reply.error), reply
    assert a.call("status", timeout=15).ok
    res = run("reload", "--socket", str(a.socket))
    assert res.returncode == 2 and "FIFO" in res.stderr, res.stderr
    res = run("validate", str(a.config))  # the CLI alone: refused at once too
    assert res.returncode == 2 and "FIFO" in res.stderr, res.stderr
    assert table(router) == before
    a.signal(signal.SIGTERM)
    assert a.wait(timeout=20) == 0


def test_a_fifo_as_state_file_is_refused_at_start(
    make_agent: Callable[..., AgentProc], router: str
) -> None:
    """F9: the start read the state file with open() and hung, deaf to SIGTERM."""
    a = make_agent()
    a.state.parent.mkdir(mode=0o700)
    os.mkfifo(a.state)
    a.start(wait=False)
    assert a.wait(timeout=30) == 4
    assert "FIFO" in a.log() and "Traceback" not in a.log()
    assert "offloadctl" not in table(router)


def _as_nobody(code: str) -> None:
    # Debian's python: the venv's interpreter lives under /root, closed to nobody.
    prelude = "import os\nos.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    res = subprocess.run(["/usr/bin/python3", "-c", prelude + code], capture_output=True)
    assert res.returncode == 0, res.stderr


def test_state_in_a_directory_others_can_write_is_refused(
    make_agent: Callable[..., AgentProc], router: str, rundir: Path
) -> None:
    """F11: uid 65534 plants ``.state.json.tmp-<pid>`` symlinks to a root-only
    file, for every pid the agent may get. The directory is world-writable
    without the sticky bit, where fs.protected_symlinks never applies (that
    sysctl is global to the host, so the test does not turn it off): the same
    attack the issue ran with it off. Before: the agent wrote its state through
    the link into the victim file."""
    victim = rundir / "victim"  # rundir: 0755, so nobody can reach ww below it
    victim.write_text("root only\n")
    victim.chmod(0o600)
    shared = rundir / "ww"
    shared.mkdir()
    shared.chmod(0o777)
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    _as_nobody(
        f"for pid in range({last + 1}, {last + 3000}):\n"
        f"    os.symlink({str(victim)!r}, {str(shared)!r} + f'/.state.json.tmp-{{pid}}')\n"
    )
    a = make_agent()
    a.args[a.args.index("--state-file") + 1] = str(shared / "state.json")
    a.start(wait=False)
    assert a.wait(timeout=30) == 4
    assert "state directory" in a.log() and "writable by group or others" in a.log()
    assert victim.read_text() == "root only\n"
    assert not (shared / "state.json").exists()
    assert "offloadctl" not in table(router)  # refused before the first apply


def test_metrics_port_in_other_digits_is_a_usage_error(tmp_path: Path) -> None:
    """F10: ``int('¹')`` raised ValueError: exit 70."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("version: 1\n")
    for port in ("\u00b9", "\u0661"):
        res = run("agent", str(cfg), "--metrics", f"127.0.0.1:{port}")
        assert res.returncode == 2 and "--metrics" in res.stderr, res.stderr


def test_a_bad_netns_name_creates_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("version: 1\n")
    target = tmp_path / "x"
    name = "../../.." + str(target / "y")
    res = run("agent", str(cfg), "--netns", name)
    assert res.returncode == 4 and "network namespace" in res.stderr, res.stderr
    assert not target.exists()
    res = run("agent", str(cfg), "--netns", "offloadctl-harden-absent")
    assert res.returncode == 4 and "does not exist" in res.stderr, res.stderr
    assert not Path("/run/offloadctl/offloadctl-harden-absent.sock").exists()
    assert not Path("/var/lib/offloadctl/offloadctl-harden-absent").exists()

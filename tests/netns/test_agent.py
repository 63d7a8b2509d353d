"""The real agent process against the host kernel, one namespace per test.

The host kernel has no flowtables, so configs here are NAT-only (what the host
accepts; see test_apply.py); flowtable behaviour of the agent (port join,
reload continuity of offloaded flows) needs the VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.agent import control, protocol
from controlplane.core.flowbook import TESTING_ALL_OFFLOADED
from controlplane.errors import EnvironmentProblem
from controlplane.kernel.ctnetlink.conntrack import dump_flows
from controlplane.kernel.ctnetlink.events import CtEvents
from tests.netns.conftest import router, sh
from tests.netns.test_teardown import CLIENT, PORT_ZONE, SERVER, Lab, lab

# Fixtures, imported for pytest; `router` (conftest's) also for the modules that import it
# from here.
__all__ = ["lab", "router"]

OFFLOADCTL = [sys.executable, "-m", "controlplane.cli"]
NAT = {"version": 1, "nat": {"masquerade": [{"oifname": "wan0", "saddr": ["10.0.1.0/24"]}]}}
NAT2 = {"version": 1, "nat": {"masquerade": [{"oifname": "wan0", "saddr": ["10.0.2.0/24"]}]}}
BAD = {"version": 1, "nat": {"masquerade": [{"oifname": "wan0;drop"}]}}


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def table(ns: str) -> str:
    return sh("nft", "-a", "list", "ruleset", netns=ns)


class AgentProc:
    def __init__(
        self, ns: str, tmp: Path, rundir: Path, config: dict[str, Any], *extra: str
    ) -> None:
        self.ns = ns
        self.config = tmp / "agent.yaml"
        self.socket = rundir / "agent.sock"
        self.state = tmp / "state" / "state.json"
        self.stderr = tmp / "agent.log"
        if not self.config.exists():
            self.write(config)
        self.args = [
            *OFFLOADCTL, "agent", str(self.config), "--netns", ns,
            "--socket", str(self.socket), "--state-file", str(self.state),
            "--watch-interval", "0.1", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] | None = None

    def write(self, config: dict[str, Any]) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        tmp.replace(self.config)  # as editors and the kubelet do

    def start(self, wait: bool = True) -> AgentProc:
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                self.args, stdout=subprocess.DEVNULL, stderr=err, env=self.env
            )
        if wait:
            wait_for(self.serving, "the agent's control socket")
        return self

    def serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.log()}")
        try:
            client = control.connect(self.socket)
        except control.AgentUnavailable:
            return False
        if client is None:
            return False
        # The socket is bound before the first apply; it is answered after it.
        with client:
            return client.call("status", timeout=30).ok

    def call(self, op: str, **args: Any) -> protocol.Response:
        client = control.connect(self.socket)
        assert client is not None
        with client:
            return client.call(op, **args)

    def log(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    made: list[AgentProc] = []
    yield made
    for a in made:
        a.kill()


@pytest.fixture
def rundir() -> Iterator[Path]:
    """The socket's directory: root-owned 0755 under /run (pytest's tmp is 0700,
    which would keep other users out whatever the socket's mode)."""
    path = Path(tempfile.mkdtemp(prefix="offloadctl-test-", dir="/run"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_agent(
    router: str, tmp_path: Path, rundir: Path, agents: list[AgentProc]
) -> Callable[..., AgentProc]:
    def make(config: dict[str, Any] = NAT, *extra: str) -> AgentProc:
        a = AgentProc(router, tmp_path, rundir, config, *extra)
        agents.append(a)
        return a

    return make


def run(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*OFFLOADCTL, *args], capture_output=True, text=True, check=False)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def as_nobody_connect(path: Path) -> str:
    """Connect to ``path`` as uid 65534 and report what happened."""
    code = (
        "import socket,sys,os\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(5)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except PermissionError:\n"
        "    print('EACCES'); sys.exit()\n"
        "print(s.recv(65536).decode().strip())\n"  # refused at accept: answered at once
    )
    # Debian's python: the venv's interpreter lives under /root, closed to nobody.
    res = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_socket_root_only_and_status(make_agent: Callable[..., AgentProc], router: str) -> None:
    a = make_agent().start()
    st = os.lstat(a.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    # Only the socket's mode 0600 keeps nobody out (its directory is traversable:
    # the 0666 step below proves it) ...
    assert as_nobody_connect(a.socket) == "EACCES"
    # ... and should the mode be loosened, the peer's uid is still checked.
    os.chmod(a.socket, 0o666)
    answer = json.loads(as_nobody_connect(a.socket))
    assert answer["ok"] is False and answer["error"]["code"] == "permission_denied"
    os.chmod(a.socket, 0o600)

    status = a.call("status")
    assert status.ok
    doc = status.result
    assert doc["netns"] == router and doc["kernel"]["table_present"] is True
    assert doc["last_apply"]["ok"] is True and doc["last_apply"]["source"] == "start"
    assert doc["control"]["refused"] == 1
    assert "masquerade" in table(router)
    assert json.loads(a.state.read_text())["schema"] == 1
    # No transparent huge pages for the agent's heap (docs/agent.md, "Memory").
    assert a.proc is not None
    assert "THP_enabled:\t0\n" in Path(f"/proc/{a.proc.pid}/status").read_text()


def test_protocol_mismatch_and_garbage_do_not_hurt(
    make_agent: Callable[..., AgentProc],
) -> None:
    a = make_agent(NAT, "--log-format", "json").start()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(a.socket))
        s.sendall(b'{"v": 2, "op": "status"}\n')
        reply = json.loads(s.makefile("rb").readline())
        assert reply["error"]["code"] == "unsupported_version"
        assert reply["error"]["supported"] == [1]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(a.socket))
        s.sendall(os.urandom(4096).replace(b"\n", b"") + b"\n")
        reply = json.loads(s.makefile("rb").readline())
        assert reply["error"]["code"] == "bad_request"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(a.socket))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"y" * (protocol.MAX_LINE * 4))
        reply = json.loads(s.makefile("rb").readline())
        assert reply["error"]["code"] == "line_too_long"
    assert a.call("status").ok  # still serving
    res = run("reload", "--socket", str(a.socket), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["changed"] is False
    for line in a.log().splitlines():
        doc = json.loads(line)  # --log-format json: every line is one object
        assert {"ts", "level", "event", "msg"} <= doc.keys()


def test_bad_config_reload_keeps_running_config(
    make_agent: Callable[..., AgentProc], router: str
) -> None:
    a = make_agent().start()
    before = table(router)
    a.write(BAD)
    res = run("reload", "--socket", str(a.socket))
    assert res.returncode == 2, res.stderr
    assert "reload refused" in res.stderr and "nat.masquerade[0].oifname" in res.stderr
    a.signal(signal.SIGHUP)
    wait_for(lambda: a.call("status").result["reloads"].get("failed", 0) >= 2, "SIGHUP reload")
    assert table(router) == before  # nothing changed in the kernel
    doc = a.call("status").result
    assert doc["last_reload"]["ok"] is False and doc["last_reload"]["source"] in ("sighup", "file")
    assert doc["last_reload"]["issues"][0]["path"] == "nat.masquerade[0].oifname"
    assert "Traceback" not in a.log()
    # A good file is picked up without a signal (the agent polls the file).
    a.write(NAT2)
    wait_for(lambda: "10.0.2.0/24" in table(router), "file-change reload")
    assert "10.0.1.0/24" not in table(router)
    assert a.call("status").result["last_reload"]["ok"] is True


def test_sigterm_leaves_state_cleanup_removes_it(
    make_agent: Callable[..., AgentProc], router: str
) -> None:
    a = make_agent().start()
    before = table(router)
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    assert table(router) == before  # same rules, same handles
    assert not a.socket.exists() and a.state.exists()
    assert "kernel state left in place" in a.log()
    b = make_agent(NAT, "--cleanup-on-exit").start()
    assert table(router) == before  # a restart reconciles: nothing re-sent
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    assert "offloadctl" not in table(router)
    assert not b.state.exists()


def test_kill9_restart_sends_nothing(make_agent: Callable[..., AgentProc], router: str) -> None:
    a = make_agent().start()
    before = table(router)
    a.kill()
    assert a.socket.exists()  # stale: the next agent must replace it
    b = make_agent().start()
    assert table(router) == before
    status = b.call("status").result
    assert status["last_apply"]["changed"] is False, (status, b.log())
    assert status["last_apply"]["ok"] is True


def test_future_state_file_refused(make_agent: Callable[..., AgentProc], router: str) -> None:
    a = make_agent()
    a.state.parent.mkdir(mode=0o700)
    a.state.write_text(json.dumps({"schema": 99, "written_by": "offloadctl 9"}))
    a.start(wait=False)
    assert a.wait() == 4
    log = a.log()
    assert "schema 99" in log and "newer offloadctl" in log and "Traceback" not in log
    assert "offloadctl" not in table(router)  # refused before touching the kernel
    assert not a.socket.exists()


def test_second_agent_refused(make_agent: Callable[..., AgentProc], router: str) -> None:
    a = make_agent().start()
    b = make_agent(NAT2)
    b.start(wait=False)
    assert b.wait() == 4
    assert "another agent answers" in b.log()
    assert "10.0.2.0/24" not in table(router)  # the second one changed nothing
    assert a.call("status").ok


def test_reload_without_agent(tmp_path: Path) -> None:
    res = run("reload", "--socket", str(tmp_path / "none.sock"))
    assert res.returncode == 4 and "no agent is running" in res.stderr


def test_insecure_socket_dir_refused(make_agent: Callable[..., AgentProc], router: str) -> None:
    a = make_agent()
    os.chmod(a.socket.parent, 0o777)
    a.start(wait=False)
    assert a.wait() == 4
    assert "writable by group or others" in a.log()
    assert "offloadctl" not in table(router)


@pytest.fixture
def bpffs() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="offloadctl-agent-bpffs-"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
    path.rmdir()


def test_reuseport_groups_from_config(
    make_agent: Callable[..., AgentProc], router: str, bpffs: Path
) -> None:
    from controlplane.kernel.bpf.loader import group_pin_dir
    from controlplane.kernel.netns import entered
    from controlplane.reuseport import ReuseportGroup

    rp = {"bpffs": str(bpffs), "groups": [{"name": "web", "max_listeners": 8}]}
    cfg = {**NAT, "reuseport": rp}
    a = make_agent(cfg).start()
    pins = Path(group_pin_dir(str(bpffs), router, "web"))
    assert (pins / "prog").exists()
    # A service registers a listener in the namespace; the agent's status shows it.
    with entered(router):
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        lsock.bind(("127.0.0.1", 8080))
        lsock.listen()
    with lsock, ReuseportGroup.open("web", router, str(bpffs)) as group:
        group.register(lsock, 1)
        group.activate(1)
        web = a.call("status").result["kernel"]["reuseport"]["web"]
        assert web["target_generation"] == 1
        assert web["generations"] == [
            {"generation": 1, "active": True, "target": True, "listeners": 1}
        ]
        assert set(web["counters"]) >= {"selected", "migrated_established", "fallback"}
    saved = json.loads(a.state.read_text())
    assert saved["reuseport"]["groups"] == ["web"]
    # SIGTERM: the pins survive the agent (services keep migrating meanwhile).
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    assert (pins / "prog").exists()
    # A reload that drops the group unloads it: the state says we own it.
    b = make_agent(cfg, "--watch-interval", "0").start()  # reload only when asked
    b.write(NAT)
    res = run("reload", "--socket", str(b.socket))
    assert res.returncode == 0, res.stderr
    assert "- reuseport group web" in res.stdout
    assert not pins.exists()
    assert json.loads(b.state.read_text())["reuseport"]["groups"] == []


def test_a_group_behind_a_hidden_bpffs_stays_owned(
    make_agent: Callable[..., AgentProc], router: str, bpffs: Path
) -> None:
    """No bpffs at the configured path (``ip netns exec`` hides one under /sys)
    does not mean the group is gone: the reload says so, the state keeps the
    group, and once the bpffs is back the next reload unloads it."""
    from controlplane.kernel.bpf.loader import group_pin_dir

    rp = {"bpffs": str(bpffs), "groups": [{"name": "web", "max_listeners": 4}]}
    a = make_agent({**NAT, "reuseport": rp}, "--watch-interval", "0").start()
    elsewhere = Path(tempfile.mkdtemp(prefix="offloadctl-agent-bpffs-bind-"))
    subprocess.run(["mount", "--bind", str(bpffs), str(elsewhere)], check=True)
    try:
        subprocess.run(["umount", "-l", str(bpffs)], check=True)  # pins live on, elsewhere
        pins = Path(group_pin_dir(str(elsewhere), router, "web"))
        a.write(NAT)
        res = run("reload", "--socket", str(a.socket))
        assert res.returncode == 0, res.stderr
        assert "- reuseport group web" not in res.stdout and (pins / "prog").exists()
        assert json.loads(a.state.read_text())["reuseport"]["groups"] == ["web"]
        assert f"reuseport group web kept as ours: no bpffs mounted at {bpffs}" in a.log()
        subprocess.run(["mount", "--bind", str(elsewhere), str(bpffs)], check=True)
        res = run("reload", "--socket", str(a.socket))
        assert res.returncode == 0, res.stderr
        assert "- reuseport group web" in res.stdout and not pins.exists()
        assert json.loads(a.state.read_text())["reuseport"]["groups"] == []
    finally:
        subprocess.run(["umount", "-l", str(elsewhere)], check=False)
        elsewhere.rmdir()


def test_sd_notify_and_metrics(make_agent: Callable[..., AgentProc], rundir: Path) -> None:
    notify_path = rundir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    a = make_agent(NAT, "--metrics", f"127.0.0.1:{port}")
    os.environ["NOTIFY_SOCKET"] = str(notify_path)
    try:
        a.start(wait=False)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    with sock:
        ready = sock.recv(4096).decode().splitlines()
        assert ready[0] == "READY=1"
        # READY comes after the first apply: the table is there by now.
        assert a.call("status").result["kernel"]["table_present"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert "offloadctl_table_present 1.0" in text
        assert 'offloadctl_applies_total{result="ok"} 1.0' in text
        a.signal(signal.SIGHUP)
        assert sock.recv(4096).decode().startswith("RELOADING=1")
        assert sock.recv(4096).decode().startswith("READY=1")
        a.signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
    assert a.wait() == 0


def test_metrics_refuses_remote_address(make_agent: Callable[..., AgentProc], router: str) -> None:
    a = make_agent(NAT, "--metrics", "0.0.0.0:9108")
    a.start(wait=False)
    assert a.wait() == 2
    assert "--metrics-allow-remote" in a.log()
    assert "offloadctl" not in table(router)


def test_invalidation_runs_inside_the_agent(
    lab: Lab, tmp_path: Path, rundir: Path, agents: list[AgentProc]
) -> None:
    """A's MAC moves from p1 to p2: the agent's watcher + engine tear down exactly
    A's flows (re-created on the classic path), B's are untouched, status counts it.
    The host has no flowtables: the test-only switch counts every entry as
    offloaded (as tests/netns/test_flows_cli.py does); the VM proves the rest."""
    cfg = {"version": 1, "nat": {"masquerade": [{"oifname": "wan"}]}}
    a = AgentProc(lab.router, tmp_path, rundir, cfg, "--log-format", "json")
    a.env = os.environ | {TESTING_ALL_OFFLOADED: "1"}
    agents.append(a)
    a.start()
    before = conntrack_ids(lab.router)
    assert len(before) == 4
    mac = sh("cat", "/sys/class/net/eth0/address", netns=lab.clients["A"]).strip()

    def torn_down() -> bool:
        inv = a.call("status").result["invalidation"]
        return bool(inv.get("flows_torn_down", 0) >= 2)

    # Re-created entries are read from their NEW events: a re-created entry can get
    # its old conntrack id back (docs/kernel-facts.md).
    with CtEvents(lab.router) as events:
        sh("bridge", "fdb", "replace", mac, "dev", "p2", "master", netns=lab.router)
        wait_for(torn_down, "the agent to tear down A's flows")
        changes, lost = events.poll()  # counted after the re-create: its NEW is queued
    inv = a.call("status").result["invalidation"]
    assert inv["flows_torn_down"] == 2 and sum(inv["by_cause"].values()) == 2, inv
    after = conntrack_ids(lab.router)
    changed = {
        (c.flow.orig.src, c.flow.orig.dport, c.flow.zone)
        for c in changes
        if c.new and c.flow.orig.proto == 6 and c.flow.orig.dst == SERVER
    }
    assert not lost and changed == {k for k in before if k[0] == CLIENT["A"]}
    assert set(after) == set(before)  # A's entries re-created, not just deleted
    for port in PORT_ZONE:  # B's connections were not touched
        assert lab.roundtrip(("B", port), b"still here") == b"still here"
    decisions = [json.loads(line) for line in a.log().splitlines()]
    assert any(d["event"] == "invalidation" and d["msg"] == "tore down" for d in decisions)


def conntrack_ids(router: str) -> dict[tuple[str, int, int], int]:
    return {
        (f.orig.src, f.orig.dport, f.zone): f.id
        for f in dump_flows(router)
        if f.orig.proto == 6 and f.orig.dst == SERVER
    }


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*OFFLOADCTL, *args], capture_output=True, text=True, check=False, env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_status_and_flows_answered_by_the_agent(
    lab: Lab, tmp_path: Path, rundir: Path, agents: list[AgentProc]
) -> None:
    """Issue 14 items 1 and 5: with an agent running on a kernel that cannot
    offload (its index holding every TCP flow as possibly offloaded), ``flows``
    and ``status`` still say what the kernel holds, the same as without the
    agent; ``--socket`` finds an agent on another socket, ``--table`` asks the
    kernel about another table even then."""
    env = os.environ | {TESTING_ALL_OFFLOADED: "1"}
    direct = cli("status", "--netns", lab.router, "--json")
    assert direct.returncode == 0 and "ownership" in json.loads(direct.stdout)
    flows_direct = cli("flows", "--netns", lab.router)
    assert flows_direct.returncode == 0, flows_direct.stderr
    tcp_direct = sorted(x for x in flows_direct.stdout.splitlines() if x.startswith("tcp "))
    assert len(tcp_direct) == 4 and all(" classic " in x for x in tcp_direct)

    cfg = {"version": 1, "nat": {"masquerade": [{"oifname": "wan"}]}}
    a = AgentProc(lab.router, tmp_path, rundir, cfg)  # on its own --socket
    a.env = env
    agents.append(a)
    a.start()
    sock = ("--socket", str(a.socket))
    try:
        # Not the default socket: without --socket the kernel answers.
        assert "agent pid" not in cli("status", "--netns", lab.router).stdout

        def read() -> dict[str, Any]:
            res = cli("status", "--netns", lab.router, "--json", *sock)
            assert res.returncode == 0, res.stderr
            doc: dict[str, Any] = json.loads(res.stdout)
            return doc

        wait_for(lambda: read()["verdict"] != "kernel not read yet", "the first kernel view")
        doc = read()
        assert doc["pid"] == a.proc.pid if a.proc else False
        assert doc["verdict"].startswith("kernel CANNOT offload (kernel refused 'add flowtable'")
        assert "; 0 of 4 forwarded flows offloaded;" in doc["verdict"]
        assert doc["invalidation"]["indexed_flows"] >= 4  # the index: possibly offloaded
        assert {"events", "overflows", "resyncs", "by_cause"} <= doc["invalidation"].keys()
        assert doc["last_apply"]["ok"] is True
        text = cli("status", "--netns", lab.router, *sock).stdout.splitlines()
        assert text[0] == f"verdict: {doc['verdict']}"
        assert f"agent pid {doc['pid']}" in text[1]
        watched = doc["invalidation"]["indexed_flows"]
        assert f"  flows indexed for invalidation (possibly offloaded): {watched}" in text
        assert not any("offloaded flows watched" in line for line in text)
        assert any("last apply:" in x and "(start) ok" in x for x in text)
        # --table: the kernel's answer about that table, not the agent's.
        other = cli("status", "--netns", lab.router, "--table", "foreign", *sock).stdout
        assert "table inet foreign: absent" in other and "agent pid" not in other

        # Flows: kernel truth from the agent too, the same lines as without it.
        answer = a.call("flows").result
        assert answer["source"] == "conntrack"
        assert not any(d["offloaded"] for d in answer["flows"])
        via_agent = cli("flows", "--netns", lab.router, *sock)
        assert via_agent.returncode == 0, via_agent.stderr
        assert (
            sorted(x for x in via_agent.stdout.splitlines() if x.startswith("tcp ")) == tcp_direct
        )
        assert via_agent.stdout.splitlines()[-1].startswith("0 of ")
        out = cli("flows", "--netns", lab.router, "--json", *sock).stdout
        lines = [d for d in map(json.loads, out.splitlines()) if d["proto"] == 6]
        assert {d["id"] for d in lines} == set(conntrack_ids(lab.router).values())
        assert all(d["orig_devices"] and d["reply_devices"] for d in lines), lines
        # One selection: flows --ip and teardown --ip --dry-run agree.
        one = cli("flows", "--netns", lab.router, "--ip", CLIENT["A"], *sock).stdout
        assert one.splitlines()[-1] == "0 of 2 forwarded flow(s) offloaded"
    finally:
        a.signal(signal.SIGTERM)
        assert a.wait() == 0
    # The agent is gone: the kernel answers again.
    assert "ownership" in json.loads(cli("status", "--netns", lab.router, "--json").stdout)


def test_link_cache_facts_render_like_the_kernels(netns: str) -> None:
    """A port join is planned from the watcher's link cache: the flowtable devices
    rendered from it equal those rendered from gather_facts (the kernel's)."""
    from controlplane.config import Config
    from controlplane.core.linkfacts import facts_from_links
    from controlplane.core.render import render
    from controlplane.kernel.rtnl import topology
    from controlplane.kernel.rtnl.facts import gather_facts

    sh("ip", "link", "add", "br0", "type", "bridge", netns=netns)
    sh("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1", netns=netns)
    for i in range(3):
        sh("ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", f"q{i}", netns=netns)
        sh("ip", "link", "set", f"p{i}", "master", "br0", netns=netns)
    cfg = Config.model_validate(
        {
            "version": 1,
            "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}],
            "policies": [{"name": "lan-wan", "flowtable": "ft"}],
        }
    )
    links = topology.snapshot((), netns).links
    cached, kernel = facts_from_links(cfg, links), gather_facts(cfg, netns)
    assert cached.bridge_ports == kernel.bridge_ports == {"br0": ("p0", "p1", "p2")}
    assert render(cfg, cached) == render(cfg, kernel)
    missing = Config.model_validate({**cfg.model_dump(), "flowtables": [
        {"name": "ft", "devices": ["wan0"], "bridges": ["br9"]}]})  # fmt: skip
    with pytest.raises(EnvironmentProblem, match="bridge br9: no such device"):
        facts_from_links(missing, links)

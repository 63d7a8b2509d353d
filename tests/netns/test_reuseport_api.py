"""The reuseport library, loader, fd handover and CLI against the real kernel:
lifecycle, policies, bad input, and use from processes that never import bcc
(or our library at all)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli.reuseport import app
from controlplane.errors import ConfigError, EnvironmentProblem, KernelError
from controlplane.kernel.bpf import syscall as bpf_syscall
from controlplane.kernel.bpf.fd_handover import HandoverServer, send_listener
from controlplane.kernel.bpf.loader import load_group, unload_group
from controlplane.kernel.netns import entered
from controlplane.reuseport import ReuseportGroup
from tests.netns import test_reuseport_support as sup

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


@pytest.fixture
def group(netns: str, bpffs: str) -> Iterator[ReuseportGroup]:
    load_group("svc", netns=netns, bpffs=bpffs)
    with ReuseportGroup.open("svc", netns=netns, bpffs=bpffs) as g:
        yield g


def connect_n(netns: str, n: int) -> list[socket.socket]:
    """``n`` clients, each having sent one line."""
    with entered(netns):
        clients = [socket.create_connection(("127.0.0.1", sup.PORT), timeout=3) for _ in range(n)]
    for c in clients:
        c.sendall(b"x\n")
    return clients


# --- bad input ---------------------------------------------------------------


def test_register_rejects_non_listening_socket(netns: str, group: ReuseportGroup) -> None:
    with entered(netns):
        s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with s, pytest.raises(KernelError, match="not listening; call listen"):
        group.register(s, 1)


def test_register_rejects_socket_without_reuseport(netns: str, group: ReuseportGroup) -> None:
    with entered(netns):
        s = sup.listener(socket.AF_INET, reuseport=False)
    with s, pytest.raises(KernelError, match="SO_REUSEPORT is not set"):
        group.register(s, 1)


def test_register_rejects_udp_and_non_sockets(netns: str, group: ReuseportGroup) -> None:
    with entered(netns):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with u, pytest.raises(KernelError, match="not a TCP socket"):
        group.register(u, 1)
    r, w = os.pipe()
    try:
        with pytest.raises(KernelError, match="not a socket"):
            group.register(r, 1)
    finally:
        os.close(r)
        os.close(w)


def test_register_twice_is_refused(netns: str, group: ReuseportGroup) -> None:
    with entered(netns):
        s = sup.listener(socket.AF_INET)
    with s:
        assert group.register(s, 1) == 0
        with pytest.raises(KernelError, match="already registered"):
            group.register(s, 2)
        assert group.state().slots == {0: 1}  # the failed attempt left nothing behind


def test_activate_needs_listeners_and_generation_in_range(group: ReuseportGroup) -> None:
    with pytest.raises(ConfigError, match="no registered listeners"):
        group.activate(3)
    with pytest.raises(ConfigError, match="out of range"):
        group.activate(0)


def test_unknown_group_is_a_clear_error(netns: str, bpffs: str) -> None:
    with pytest.raises(EnvironmentProblem, match=r"'nope' is not loaded in .*reuseport load"):
        ReuseportGroup.open("nope", netns=netns, bpffs=bpffs)


def test_missing_bpffs_is_a_clear_error(netns: str, tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="no bpffs mounted at"):
        ReuseportGroup.open("svc", netns=netns, bpffs=str(tmp_path))


def test_unknown_netns_is_a_clear_error(bpffs: str) -> None:
    with pytest.raises(EnvironmentProblem, match="does not exist"):
        load_group("svc", netns="cpt-missing-ns", bpffs=bpffs)


def test_group_full(netns: str, bpffs: str) -> None:
    load_group("tiny", netns=netns, bpffs=bpffs, max_listeners=2)
    with ReuseportGroup.open("tiny", netns=netns, bpffs=bpffs) as g, entered(netns):
        socks = [sup.listener(socket.AF_INET) for _ in range(3)]
        g.register(socks[0], 1)
        g.register(socks[1], 1)
        with pytest.raises(EnvironmentProblem, match="full"):
            g.register(socks[2], 1)
        socks[0].close()  # a closed listener frees its slot by itself
        assert g.register(socks[2], 2) == 0
        for s in socks:
            s.close()


# --- loader -------------------------------------------------------------------


def test_loader_mounts_bpffs_and_is_idempotent(netns: str, tmp_path: Path) -> None:
    where = str(tmp_path / "bpf")
    try:
        first = load_group("svc", netns=netns, bpffs=where)
        assert first.mounted_bpffs and not first.already_loaded
        assert bpf_syscall.is_bpffs(where)
        again = load_group("svc", netns=netns, bpffs=where)
        assert again.already_loaded and again.prog_id == first.prog_id
        assert sorted(os.listdir(first.pin_dir)) == sorted(
            ["prog", "socks", "slot_gen", "gen_state", "policy", "ctl", "counters"]
        )
        assert first.pin_dir == f"{where}/offloadctl/{netns}/svc"
        with pytest.raises(EnvironmentProblem, match="already loaded with 64"):
            load_group("svc", netns=netns, bpffs=where, max_listeners=8)
        res = unload_group("svc", netns=netns, bpffs=where)
        assert res.live_listeners == 0
        assert res.unmounted_bpffs and not bpf_syscall.is_bpffs(where)  # load had mounted it
        assert not os.path.exists(first.pin_dir)
    finally:
        subprocess.run(["umount", "-l", where], check=False)


# --- lifecycle and policy ---------------------------------------------------------


def test_attach_follows_a_recreated_group(netns: str, group: ReuseportGroup) -> None:
    """Every listener closing destroys the kernel group and its program; the
    next registration must attach again for migration to keep working."""
    for gen in (1, 3):
        with entered(netns):
            old = [sup.listener(socket.AF_INET) for _ in range(2)]
        for s in old:
            group.register(s, gen)
        group.activate(gen)
        clients = connect_n(netns, 10)
        with entered(netns):
            new = sup.listener(socket.AF_INET)
        group.register(new, gen + 1)
        group.activate(gen + 1)
        group.retire(gen)
        for s in old:
            s.close()
        with new:
            assert len(sup.serve(new, 10, timeout=3)) == 10
        for c in clients:
            c.close()
        group.retire(gen + 1)
        # `new` is closed: the whole kernel group is gone now.
    n = group.counters()
    assert (n.selected, n.migrated_established, n.fallback) == (20, 20, 0)


@pytest.mark.parametrize("drop", [True, False], ids=["drop", "fallback"])
def test_no_target_drops_or_falls_back(netns: str, bpffs: str, drop: bool) -> None:
    """Generation 1's only listener closes and no generation is left to take
    its queue; a listener outside any generation is still in the group."""
    load_group("pol", netns=netns, bpffs=bpffs, drop_when_no_target=drop)
    with ReuseportGroup.open("pol", netns=netns, bpffs=bpffs) as g:
        with entered(netns):
            only = sup.listener(socket.AF_INET)
            bystander = sup.listener(socket.AF_INET)
        g.register(only, 1)
        g.activate(1)
        clients = connect_n(netns, 20)
        only.close()
        with bystander:
            served = sup.serve(bystander, 20, timeout=0.5 if drop else 3)
        outcome = sup.collect(clients, timeout=3)
        c = g.counters()
    if drop:
        assert (c.dropped, c.fallback, len(served), outcome.reset) == (20, 0, 0, 20)
    else:
        assert (c.dropped, c.fallback, len(served), outcome.reset) == (0, 20, 20, 0)


def test_separate_process_uses_pins_without_bcc(
    netns: str, bpffs: str, group: ReuseportGroup
) -> None:
    code = textwrap.dedent(
        f"""
        import socket, sys
        from controlplane.kernel.netns import entered
        from controlplane.reuseport import ReuseportGroup
        with entered({netns!r}):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", {sup.PORT}))
            s.listen(16)
        g = ReuseportGroup.open("svc", netns={netns!r}, bpffs={bpffs!r})
        slot = g.register(s, 5)
        g.activate(5)
        print(slot, "bcc" in sys.modules, flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().split() == ["0", "False"]
        st = group.status()
        assert st.target_generation == 5
        assert [(g.generation, g.slots) for g in st.generations] == [(5, (0,))]
        for c in connect_n(netns, 3):
            c.close()
        assert group.counters().selected == 3
    finally:
        proc.kill()
        proc.wait()
    # The listener died with its process: the slot is free again.
    assert group.state().slots == {}


# --- fd handover ----------------------------------------------------------------

# A "service" that cannot import our library: plain sockets and sendmsg().
_SENDER = """
import array, ctypes, socket, sys
netns_fd = open("/run/netns/" + sys.argv[1])
assert ctypes.CDLL(None).setns(netns_fd.fileno(), 0x40000000) == 0
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[3])))
s.listen(16)
a = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.connect(sys.argv[2])
a.sendmsg([b"register generation=7\\n"],
          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
print(a.recv(256).decode().strip(), flush=True)
print(s.fileno(), flush=True)
sys.stdin.read()
"""


def test_scm_rights_handover_from_a_foreign_process(
    netns: str, group: ReuseportGroup, tmp_path: Path
) -> None:
    path = str(tmp_path / "agent.sock")
    with HandoverServer(path) as server:
        results: list[object] = []
        t = threading.Thread(
            target=lambda: results.extend(server.serve_one(group.register, timeout=10))
        )
        t.start()
        proc = subprocess.Popen(
            [sys.executable, "-c", _SENDER, netns, path, str(sup.PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ok slot=0"
            proc.stdout.readline()
            group.activate(7)
            for c in connect_n(netns, 4):
                c.close()
            assert group.counters().selected == 4
        finally:
            proc.kill()
            proc.wait()
            t.join()
    [res] = results
    assert getattr(res, "generation", None) == 7 and getattr(res, "pid", None) == proc.pid


def test_handover_reports_refusals_to_the_sender(
    netns: str, group: ReuseportGroup, tmp_path: Path
) -> None:
    path = str(tmp_path / "agent.sock")
    with HandoverServer(path) as server:
        t = threading.Thread(target=lambda: server.serve_one(group.register, timeout=10))
        t.start()
        with entered(netns):
            not_listening = socket.socket()
        try:
            with pytest.raises(KernelError, match=r"agent: .*SO_REUSEPORT is not set"):
                send_listener(path, not_listening.fileno(), 1)
        finally:
            not_listening.close()
            t.join()


def test_adopt_by_pid_and_fd_through_the_cli(netns: str, group: ReuseportGroup, bpffs: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, netns, str(sup.PORT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        fd = int(proc.stdout.readline())
        args = ["--name", "svc", "--netns", netns, "--bpffs", bpffs]
        res = CliRunner().invoke(
            app, ["adopt", *args, "-g", "4", "--pid", str(proc.pid), "--fd", str(fd)]
        )
        assert res.exit_code == 0, res.output
        assert f"registered fd {fd} of pid {proc.pid} as generation 4, slot 0" in res.output
        assert group.state().slots == {0: 4}
        bad = CliRunner().invoke(
            app, ["adopt", *args, "-g", "4", "--pid", str(proc.pid), "--fd", "999"]
        )
        assert bad.exit_code == 4
        assert bad.output.strip() == f"offloadctl: process {proc.pid} has no open fd 999"
    finally:
        proc.kill()
        proc.wait()


_HOLDER = """
import ctypes, socket, sys
netns_fd = open("/run/netns/" + sys.argv[1])
assert ctypes.CDLL(None).setns(netns_fd.fileno(), 0x40000000) == 0
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[2])))
s.listen(16)
print(s.fileno(), flush=True)
sys.stdin.read()
"""


# --- CLI ------------------------------------------------------------------------


def test_cli_lifecycle(netns: str, bpffs: str) -> None:
    run = CliRunner().invoke
    args = ["--name", "cli", "--netns", netns, "--bpffs", bpffs]
    res = run(app, ["load", *args, "--max-listeners", "8"])
    assert res.exit_code == 0, res.output
    assert "loaded group 'cli'" in res.output and "8 listener slots" in res.output
    assert "already loaded" in run(app, ["load", *args, "--max-listeners", "8"]).output

    with entered(netns):
        socks = [sup.listener(socket.AF_INET) for _ in range(2)]
    with ReuseportGroup.open("cli", netns=netns, bpffs=bpffs) as g:
        g.register(socks[0], 1)
        g.register(socks[1], 2)
    res = run(app, ["activate", *args, "-g", "1"])
    assert res.exit_code == 0 and "target generation 1" in res.output
    res = run(app, ["activate", *args, "-g", "2"])
    assert "target generation 2" in res.output
    for c in connect_n(netns, 3):
        c.close()

    res = run(app, ["status", *args])
    assert res.exit_code == 0
    assert "target generation: 2" in res.output
    assert "selected 3" in res.output
    data = json.loads(run(app, ["status", *args, "--json"]).output)
    assert data["target_generation"] == 2 and data["listeners"] == 2
    assert data["counters"]["selected"] == 3
    assert [(g["generation"], g["target"]) for g in data["generations"]] == [
        (2, True),
        (1, False),
    ]

    res = run(app, ["retire", *args, "-g", "2"])
    assert "1 slots freed" in res.output and "target generation 1" in res.output
    res = run(app, ["unload", *args])
    assert res.exit_code == 0 and "1 registered listeners still open" in res.output
    for s in socks:
        s.close()


def test_cli_errors_are_one_line_with_exit_codes(netns: str, bpffs: str, tmp_path: Path) -> None:
    run = CliRunner().invoke
    res = run(app, ["status", "--name", "ghost", "--netns", netns, "--bpffs", bpffs])
    assert res.exit_code == 4
    assert res.output.count("\n") == 1 and res.output.startswith("offloadctl: reuseport group")
    res = run(app, ["status", "--name", "x", "--netns", netns, "--bpffs", str(tmp_path)])
    assert res.exit_code == 4 and "no bpffs mounted" in res.output
    load_group("svc", netns=netns, bpffs=bpffs)
    res = run(app, ["activate", "--name", "svc", "--netns", netns, "--bpffs", bpffs, "-g", "9"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "Traceback" not in res.output


def test_cli_receive_registers_sent_listeners(
    netns: str, group: ReuseportGroup, bpffs: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "agent.sock")
    args = ["--name", "svc", "--netns", netns, "--bpffs", bpffs]
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(
            CliRunner().invoke(app, ["receive", *args, "--socket", path, "--clients", "1"])
        )
    )
    t.start()
    sup.wait_for("the agent socket", lambda: os.path.exists(path))
    with entered(netns):
        s = sup.listener(socket.AF_INET)
    with s:
        assert send_listener(path, s.fileno(), 3) == 0
        t.join(timeout=10)
        assert group.state().slots == {0: 3}
    [res] = result
    assert getattr(res, "exit_code", None) == 0
    assert "generation 3 -> slot 0" in getattr(res, "output", "")


def test_one_group_name_covers_ipv4_and_ipv6(netns: str, group: ReuseportGroup) -> None:
    """IPv4 and IPv6 listeners form two kernel reuseport groups under one name:
    the program skips slots of the other family instead of falling back."""
    with entered(netns):
        v4 = sup.listener(socket.AF_INET)
        v6 = sup.listener(socket.AF_INET6)
    with v4, v6:
        group.register(v6, 1)  # slot 0: tried first for many hashes
        group.register(v4, 1)
        group.activate(1)
        with entered(netns):
            for fam in (socket.AF_INET, socket.AF_INET6) * 10:
                socket.create_connection((sup.addr(fam), sup.PORT), timeout=3).close()
        n = group.counters()
    assert (n.selected, n.fallback) == (20, 0)

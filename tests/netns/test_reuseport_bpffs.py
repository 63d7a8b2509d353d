"""bpffs as a trust boundary: what 'reuseport load' may mount and unmount, what
a loader killed mid-load leaves and who removes it, and what a service that
lacks permissions on the pins is told (issue 7, item 6)."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli.reuseport import app
from controlplane.kernel.bpf import syscall as bpf_syscall
from controlplane.kernel.bpf.fd_handover import send_listener
from controlplane.kernel.bpf.loader import (
    MOUNT_MARKER,
    PIN_NAMES,
    TEST_PAUSE_ENV,
    load_group,
    remove_stale_staging,
    remove_stale_staging_if_idle,
    unload_group,
)
from controlplane.reuseport import ReuseportGroup
from tests.netns import test_reuseport_support as sup

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory everybody may traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="offloadctl-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in sorted(path.iterdir(), reverse=True):
            if bpf_syscall.is_bpffs(str(sub)):
                subprocess.run(["umount", "-l", str(sub)], check=False)
        subprocess.run(["rm", "-rf", str(path)], check=False)


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


# --- mounting -----------------------------------------------------------------


def test_load_never_mounts_over_files(netns: str, open_dir: Path) -> None:
    data = open_dir / "data"
    data.mkdir()
    (data / "keep.txt").write_text("mine\n")
    code, out = cli("load", "--name", "svc", "--netns", netns, "--bpffs", str(data))
    assert code == 4, out
    assert out.count("\n") == 1
    assert f"refusing to mount bpffs over {data}: it is a non-empty directory" in out
    assert f"'mount -t bpf bpf {data}'" in out  # the way out
    assert not bpf_syscall.is_bpffs(str(data))
    assert (data / "keep.txt").read_text() == "mine\n"

    afile = open_dir / "afile"
    afile.write_text("x")
    code, out = cli("load", "--name", "svc", "--netns", netns, "--bpffs", str(afile))
    assert code == 4 and "it is not a directory" in out and out.count("\n") == 1


@pytest.mark.parametrize("exists", [False, True], ids=["missing-dir", "empty-dir"])
def test_a_mount_load_made_goes_with_the_last_group(
    netns: str, open_dir: Path, exists: bool
) -> None:
    where = open_dir / "bpf"
    if exists:
        where.mkdir()
    first = load_group("one", netns=netns, bpffs=str(where))
    second = load_group("two", netns=netns, bpffs=str(where))
    assert (first.mounted_bpffs, second.mounted_bpffs) == (True, False)
    assert os.path.islink(where / MOUNT_MARKER)

    assert not unload_group("one", netns=netns, bpffs=str(where)).unmounted_bpffs
    assert bpf_syscall.is_bpffs(str(where)), "another group still lives there"
    code, out = cli("unload", "--name", "two", "--netns", netns, "--bpffs", str(where))
    assert code == 0, out
    assert f"unmounted bpffs at {where} (load had mounted it)" in out
    assert not bpf_syscall.is_bpffs(str(where))
    assert not os.path.ismount(where)


def test_unload_keeps_a_mount_someone_else_uses(netns: str, open_dir: Path) -> None:
    where = open_dir / "bpf"
    load_group("svc", netns=netns, bpffs=str(where))
    (where / "theirs").mkdir()  # somebody else's pins under our mount
    res = unload_group("svc", netns=netns, bpffs=str(where))
    assert not res.unmounted_bpffs
    assert bpf_syscall.is_bpffs(str(where)) and (where / "theirs").is_dir()
    assert os.path.islink(where / MOUNT_MARKER)


def test_unload_never_unmounts_a_bpffs_it_did_not_mount(netns: str, open_dir: Path) -> None:
    where = open_dir / "bpf"
    where.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(where)], check=True)
    res = load_group("svc", netns=netns, bpffs=str(where))
    assert not res.mounted_bpffs and not os.path.lexists(where / MOUNT_MARKER)
    assert not unload_group("svc", netns=netns, bpffs=str(where)).unmounted_bpffs
    assert bpf_syscall.is_bpffs(str(where))


# --- a loader killed mid-load --------------------------------------------------


def start_paused_loader(
    netns: str, bpffs: str, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """An 'offloadctl reuseport load' stopped right after pinning into staging."""
    marker = tmp_path / "staged"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "controlplane.cli", "reuseport", "load"),
            *("--name", "svc", "--netns", netns, "--bpffs", bpffs),
        ],
        cwd=REPO,
        env={**os.environ, TEST_PAUSE_ENV: str(marker)},
    )
    sup.wait_for("the loader to stage its pins", marker.exists, timeout=60)
    return proc, marker.read_text()


@pytest.mark.parametrize("cleaner", ["load", "unload", "status"])
def test_staging_of_a_killed_loader_is_removed(
    netns: str, bpffs: str, tmp_path: Path, cleaner: str
) -> None:
    proc, staging = start_paused_loader(netns, bpffs, tmp_path)
    try:
        assert sorted(os.listdir(staging)) == sorted(PIN_NAMES)
        assert staging.endswith(f"/svc~loading-{proc.pid}")
        # Alive: its staging directory is not touched by anybody.
        assert remove_stale_staging_if_idle(bpffs) == []
        assert remove_stale_staging(bpffs) == []
        assert os.path.isdir(staging)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # A pid that is alive again (ours, as if reused) does not protect it: the
    # proof of death is the lock the kernel released, not the pid.
    reused = staging.rsplit("-", 1)[0] + f"-{os.getpid()}"
    os.rename(staging, reused)

    args = ["--name", "svc", "--netns", netns, "--bpffs", bpffs]
    res = CliRunner().invoke(app, [cleaner, *args])
    if cleaner == "load":
        assert res.exit_code == 0, res.output
        assert "loaded group 'svc'" in res.output
    else:
        assert res.exit_code == 4 and "'svc' is not loaded" in res.output
    assert f"removed {reused}, left by a load that died" in res.output.replace("\n", " ")
    assert not os.path.exists(reused)
    assert glob.glob(f"{bpffs}/offloadctl/*/*~*") == []
    with contextlib.suppress(Exception):
        unload_group("svc", netns=netns, bpffs=bpffs)


# --- permissions -----------------------------------------------------------------

_OPEN_AS_SERVICE = textwrap.dedent(
    """
    import sys
    from controlplane.errors import ControlPlaneError
    from controlplane.reuseport import ReuseportGroup
    try:
        with ReuseportGroup.open("svc", netns=sys.argv[1], bpffs=sys.argv[2]) as g:
            print("opened", g.status().capacity)
    except ControlPlaneError as exc:
        print(type(exc).__name__, exc.exit_code, exc)
    """
)


def open_as(uid: int, gid: int, netns: str, bpffs: str) -> str:
    res = subprocess.run(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"),
            *(sys.executable, "-c", _OPEN_AS_SERVICE, netns, bpffs),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return res.stdout.strip()


def test_unprivileged_service_is_told_about_permissions(
    netns: str, bpffs: str, open_dir: Path
) -> None:
    # A bpffs mounted by 'load' (mode 0700): the pin directory cannot be reached.
    where = str(open_dir / "bpf")
    load_group("svc", netns=netns, bpffs=where)
    # A bpffs anybody may enter, pins as bpf(2) makes them (0600, root).
    load_group("svc", netns=netns, bpffs=bpffs)
    try:
        for path in (where, bpffs):
            out = open_as(NOBODY, NOBODY, netns, path)
            assert out.startswith(
                f"EnvironmentProblem 4 cannot open reuseport group 'svc' in {netns} as uid"
                f" {NOBODY}: permission denied"
            ), out
            assert "is not loaded" not in out
            assert "'offloadctl reuseport receive --socket-group GROUP' or 'adopt'" in out
            assert "chgrp" in out

        # The way out named last works: give a group access to the pins.
        gid = 4242
        pin_dir = f"{bpffs}/offloadctl/{netns}/svc"
        for d in (f"{bpffs}/offloadctl", f"{bpffs}/offloadctl/{netns}", pin_dir):
            os.chown(d, 0, gid)
            os.chmod(d, 0o750)
        for pin in PIN_NAMES:
            os.chown(f"{pin_dir}/{pin}", 0, gid)
            os.chmod(f"{pin_dir}/{pin}", 0o660)
        assert open_as(NOBODY, gid, netns, bpffs) == "opened 64"
        assert open_as(NOBODY, NOBODY, netns, bpffs).startswith("EnvironmentProblem 4")
    finally:
        unload_group("svc", netns=netns, bpffs=where)
        unload_group("svc", netns=netns, bpffs=bpffs)


def test_unprivileged_cli_status_is_one_line_exit_4(netns: str, bpffs: str) -> None:
    load_group("svc", netns=netns, bpffs=bpffs)
    try:
        res = subprocess.run(
            [
                *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
                *(sys.executable, "-m", "controlplane.cli", "reuseport", "status"),
                *("--name", "svc", "--netns", netns, "--bpffs", bpffs),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 4, res.stderr
        assert res.stderr.count("\n") == 1 and "permission denied" in res.stderr
    finally:
        unload_group("svc", netns=netns, bpffs=bpffs)


# A service that cannot open the pins: it binds in the namespace (entered as
# root by 'ip netns exec', then dropped to nobody by setpriv) and sends its
# listener to the agent.
_SEND_AS_SERVICE = textwrap.dedent(
    """
    import os, socket, sys
    from controlplane.errors import ControlPlaneError
    from controlplane.kernel.bpf.fd_handover import send_listener
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", int(sys.argv[2])))
    s.listen(16)
    try:
        print("uid", os.getuid(), "slot", send_listener(sys.argv[1], s.fileno(), 3), flush=True)
    except ControlPlaneError as exc:
        print(exc, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("shared", [True, False], ids=["socket-group", "root-only"])
def test_unprivileged_service_hands_its_listener_to_receive(
    netns: str, bpffs: str, open_dir: Path, shared: bool
) -> None:
    gid = 4243
    load_group("svc", netns=netns, bpffs=bpffs)
    path = str(open_dir / "agent.sock")
    args = ["--name", "svc", "--netns", netns, "--bpffs", bpffs, "--socket", path]
    args += ["--clients", "1"] + (["--socket-group", str(gid)] if shared else [])
    results: list[object] = []
    agent = threading.Thread(
        target=lambda: results.append(CliRunner().invoke(app, ["receive", *args]))
    )
    agent.start()
    sup.wait_for("the agent socket", lambda: os.path.exists(path))
    service = subprocess.Popen(
        [
            *("ip", "netns", "exec", netns),
            *("setpriv", f"--reuid={NOBODY}", f"--regid={gid}", "--clear-groups"),
            *(sys.executable, "-c", _SEND_AS_SERVICE, path, str(sup.PORT)),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None
        line = service.stdout.readline().strip()
        with ReuseportGroup.open("svc", netns=netns, bpffs=bpffs) as group:
            if shared:
                assert line == f"uid {NOBODY} slot 0"
                assert dict(group.state().slots) == {0: 3}
            else:
                assert line == f"cannot reach the agent at {path}: Permission denied"
                assert dict(group.state().slots) == {}
    finally:
        service.kill()
        service.wait()
        if not shared:  # the agent still waits for its one client
            with contextlib.suppress(Exception):
                send_listener(path, -1, 1, timeout=1)
        agent.join(timeout=10)
        unload_group("svc", netns=netns, bpffs=bpffs)


def test_a_namespace_name_with_a_dot_gets_its_own_pin_directory(netns: str, bpffs: str) -> None:
    """`ip netns add a.b` is legal but bpffs refuses names with a dot (EPERM):
    the pin directory's name is encoded, and unload removes it again."""
    dotted = f"{netns}.v2"
    subprocess.run(["ip", "netns", "add", dotted], check=True)
    try:
        loaded = load_group("web", netns=dotted, bpffs=bpffs)
        assert os.path.isdir(loaded.pin_dir)
        assert os.path.basename(os.path.dirname(loaded.pin_dir)) == f"{netns}%2ev2"
        with ReuseportGroup.open("web", netns=dotted, bpffs=bpffs) as group:
            assert group.status().generations == ()
        unload_group("web", netns=dotted, bpffs=bpffs)
        assert not os.path.exists(os.path.dirname(loaded.pin_dir))
    finally:
        subprocess.run(["ip", "netns", "del", dotted], check=False)

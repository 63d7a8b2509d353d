"""Compile, load and pin the reuseport migration program (bcc), and unpin it.

Layout under bpffs, one directory per network namespace and group::

    <bpffs>/offloadctl/<netns name or "host">/<group>/
        prog       SK_REUSEPORT program, attach type SELECT_OR_MIGRATE
        socks      REUSEPORT_SOCKARRAY: slot -> listener
        slot_gen   ARRAY: slot -> generation (0 = free)
        gen_state  HASH: generation -> state bits (1 = active)
        policy     ARRAY[2]: target tables, double-buffered
        ctl        ARRAY[1]: {live table index, flags}
        counters   ARRAY[5]: outcome counters

Everything after loading (registering, activating, reading counters) goes
through these pins with raw syscalls (:mod:`controlplane.reuseport`), so only
this module imports bcc, and only inside :func:`load_group`.

Pins are made in a staging sibling directory (``<group>~loading-<pid>``) and
renamed into place, so a reader never sees a half-loaded group. Loads and
unloads hold an flock on the root-only file :data:`LOCK_PATH`, and a loader
also holds an flock on its own staging directory until it is renamed: the
kernel drops both locks when a loader dies, even by ``kill -9``, so a
staging directory whose lock can be taken belongs to a dead loader and is
removed by the next load, unload or status. A lock proves death where a pid
cannot (pids are reused and differ between pid namespaces).

``load`` mounts a bpffs only where nothing would be hidden (a missing or empty
directory) and leaves the symlink :data:`MOUNT_MARKER` at the root of a mount
it made; ``unload`` of the last group removes such a mount again, and only
such a mount.

The program is *not* attached here: attaching needs a socket of the group,
and a reuseport group only exists while it has listeners. Registering a
listener attaches it (:meth:`controlplane.reuseport.ReuseportGroup.register`).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import fcntl
import os
import signal
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from controlplane.core.reuseport_policy import check_group_name
from controlplane.errors import EnvironmentProblem, KernelError, UnsupportedError
from controlplane.kernel.bpf import syscall as sysbpf
from controlplane.kernel.netns import NETNS_DIR, netns_path

__all__ = [
    "DEFAULT_BPFFS",
    "MOUNT_MARKER",
    "PIN_NAMES",
    "LoadResult",
    "UnloadResult",
    "current_netns_name",
    "ensure_bpffs",
    "group_pin_dir",
    "load_group",
    "netns_label",
    "remove_stale_staging",
    "require_bpffs",
    "unload_group",
]

DEFAULT_BPFFS = "/sys/fs/bpf"
PIN_ROOT = "offloadctl"
HOST_LABEL = "host"
PIN_NAMES = ("prog", "socks", "slot_gen", "gen_state", "policy", "ctl", "counters")
# Maps declared in the C source (bcc creates them); socks comes from Python.
_C_MAPS = ("slot_gen", "gen_state", "policy", "ctl", "counters")

# Package data: installed beside this module (the .deb's venv), or the source tree's.
BPF_SOURCE = Path(__file__).with_name("reuseport_migrate.c")
_HEADERS = Path(__file__).resolve().parents[3] / "build" / "kernel-headers"  # make setup's
_FUNC = b"select_or_migrate"
_ATTACH_SELECT_OR_MIGRATE = 40  # enum bpf_attach_type; bcc 0.26 has no name for it
MAX_CAPACITY = 4096
# bpffs refuses names with dots, and "~" cannot appear in a group name.
STAGING_INFIX = "~loading-"
# Symlink at the root of a bpffs that 'load' mounted (bpffs has no regular
# files; a symlink carries a sentence for whoever runs ls).
MOUNT_MARKER = "offloadctl-mounted"
_MARKER_TEXT = "mounted by offloadctl reuseport load; unload of the last group unmounts it"
# Test hook: after the pins are staged, write the staging path to this file and
# wait to be killed, so a test can kill -9 a loader at that exact point.
TEST_PAUSE_ENV = "OFFLOADCTL_TEST_PAUSE_AFTER_STAGING"
LOCK_PATH = "/run/offloadctl/bpffs.lock"


def current_netns_name() -> str:
    """The ``ip netns`` name of this thread's network namespace, else "host".

    Any namespace without a name under /run/netns counts as the host: that is
    where a service started without 'ip netns' runs (in a container, the
    container's own namespace).
    """
    here = os.stat("/proc/thread-self/ns/net")
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        names = []
    for name in names:
        try:
            st = os.stat(os.path.join(NETNS_DIR, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
            return name
    return HOST_LABEL


def netns_label(netns: str | None) -> str:
    """Directory name for ``netns``: its name, "host", or the current one if None."""
    if netns is None:
        return current_netns_name()
    if netns == HOST_LABEL:
        return HOST_LABEL
    path = netns_path(netns)  # validates the name
    if not os.path.exists(path):
        raise EnvironmentProblem(
            f"network namespace {netns!r} does not exist (no {path}); create it with"
            f" 'ip netns add {netns}'"
        )
    return netns


def group_pin_dir(bpffs: str, label: str, group: str) -> str:
    return os.path.join(bpffs, PIN_ROOT, label, check_group_name(group))


def _bpffs_hint(bpffs: str) -> str:
    if bpffs.startswith("/sys/"):
        # ip netns exec mounts a fresh sysfs over /sys in a private mount
        # namespace, hiding a bpffs mounted below it.
        return (
            "; note that 'ip netns exec' hides mounts under /sys: enter only the"
            " network namespace (setns) or use a bpffs outside /sys"
        )
    return ""


def require_bpffs(bpffs: str) -> None:
    if sysbpf.is_bpffs(bpffs):
        return
    try:
        os.stat(bpffs)
    except PermissionError:
        raise EnvironmentProblem(
            f"permission denied looking up {bpffs} (uid {os.geteuid()}); run as root or"
            " hand listeners to a root agent ('offloadctl reuseport receive --socket-group"
            " GROUP' or 'adopt')"
        ) from None
    except OSError:
        pass
    raise EnvironmentProblem(
        f"no bpffs mounted at {bpffs}; mount it with 'mount -t bpf bpf {bpffs}'"
        f" or run 'offloadctl reuseport load', which mounts it{_bpffs_hint(bpffs)}"
    )


def ensure_bpffs(bpffs: str) -> bool:
    """Mount bpffs at ``bpffs`` unless it is one already; True if we mounted it.

    Never mounts over a directory with files in it (the mount would hide
    them) or over anything that is not a directory.
    """
    if not os.path.isabs(bpffs):
        raise EnvironmentProblem(f"bpffs path must be absolute, got {bpffs!r}")
    if sysbpf.is_bpffs(bpffs):
        return False
    try:
        st = os.stat(bpffs)
    except FileNotFoundError:
        pass  # mount_bpffs creates it
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise EnvironmentProblem(
                f"refusing to mount bpffs at {bpffs}: it is not a directory; pass a new or"
                " empty directory with --bpffs"
            )
        if os.listdir(bpffs):
            raise EnvironmentProblem(
                f"refusing to mount bpffs over {bpffs}: it is a non-empty directory, not a"
                " bpffs, and the mount would hide its files; pass a new or empty directory"
                f" with --bpffs, or mount a bpffs there yourself ('mount -t bpf bpf {bpffs}')"
            )
    sysbpf.mount_bpffs(bpffs)
    try:
        os.symlink(_MARKER_TEXT, os.path.join(bpffs, MOUNT_MARKER))
    except OSError as exc:
        sysbpf.umount(bpffs)
        raise EnvironmentProblem(f"cannot mark the bpffs mounted at {bpffs}: {exc}") from None
    return True


def _unmount_if_ours_and_unused(bpffs: str) -> bool:
    """Unmount ``bpffs`` if 'load' mounted it and nothing is pinned in it any more."""
    if not os.path.islink(os.path.join(bpffs, MOUNT_MARKER)) or not os.path.ismount(bpffs):
        return False
    # Names with dots (maps.debug, progs.debug) are the kernel's own preloaded
    # iterators: bpffs refuses dots in names anybody else creates.
    others = [n for n in os.listdir(bpffs) if n != MOUNT_MARKER and "." not in n]
    if others:
        return False
    os.unlink(os.path.join(bpffs, MOUNT_MARKER))
    sysbpf.umount(bpffs)
    return True


@contextlib.contextmanager
def _mount_lock(bpffs: str, *, blocking: bool = True) -> Iterator[bool]:
    """Serialise loads and unloads (mounting, staging, unmounting); yields
    False if busy and not ``blocking``.

    A root-only lock file, not a directory under or above ``bpffs``: mounting
    and unmounting replace the inode a lock on the mount point would sit on,
    and any user may open (and so flock) a world-readable directory, which
    would let them hold every load up.
    """
    del bpffs  # one lock for every bpffs: loads are rare and short
    try:
        os.makedirs(os.path.dirname(LOCK_PATH), mode=0o700, exist_ok=True)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot open the lock {LOCK_PATH}: {exc.strerror} (loading and unloading"
            " reuseport groups needs root)"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_stale_staging(bpffs: str) -> list[str]:
    """Remove staging directories left by loaders that died; returns their paths.

    A live loader holds an flock on its staging directory; a dead one's lock
    was released by the kernel, so taking it proves the loader is gone.
    """
    removed: list[str] = []
    root = os.path.join(bpffs, PIN_ROOT)
    try:
        labels = os.listdir(root)
    except OSError:
        return removed
    for label in labels:
        try:
            entries = os.listdir(os.path.join(root, label))
        except OSError:
            continue
        for entry in entries:
            if STAGING_INFIX not in entry:
                continue
            path = os.path.join(root, label, entry)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _remove_pins(path)
                removed.append(path)
            except OSError:
                continue  # locked by a live loader, or not ours to remove
            finally:
                os.close(fd)
    return removed


def remove_stale_staging_if_idle(bpffs: str) -> list[str]:
    """:func:`remove_stale_staging` unless a load or unload is running (for status)."""
    if not sysbpf.is_bpffs(bpffs):
        return []
    try:
        with _mount_lock(bpffs, blocking=False) as got:
            return remove_stale_staging(bpffs) if got else []
    except EnvironmentProblem:
        return []


@dataclass(frozen=True)
class LoadResult:
    group: str
    netns: str
    pin_dir: str
    capacity: int
    prog_id: int
    compile_seconds: float
    mounted_bpffs: bool
    already_loaded: bool
    stale_staging_removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnloadResult:
    group: str
    netns: str
    pin_dir: str
    live_listeners: int
    unmounted_bpffs: bool = False
    stale_staging_removed: tuple[str, ...] = ()


def _kernel_source() -> None:
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    if _HEADERS.is_dir():
        os.environ["BCC_KERNEL_SOURCE"] = str(_HEADERS)
        return
    running = f"/lib/modules/{os.uname().release}/build"
    if os.path.isdir(running):
        return  # bcc's own default: the headers package of the running kernel
    raise EnvironmentProblem(
        f"bcc needs a kernel header tree: install the running kernel's headers ({running}),"
        f" set BCC_KERNEL_SOURCE, or run 'make setup' in a source tree (which builds {_HEADERS})"
    )


def _existing(pin_dir: str, group: str, label: str, capacity: int) -> int:
    """Validate an already-loaded group; return its program id."""
    missing = [n for n in PIN_NAMES if not os.path.exists(os.path.join(pin_dir, n))]
    if missing:
        raise EnvironmentProblem(
            f"group {group!r} in {label} is half there ({pin_dir} lacks"
            f" {', '.join(missing)}); run 'offloadctl reuseport unload --name {group}' first"
        )
    with sysbpf.BpfMap.open_pinned(os.path.join(pin_dir, "socks")) as socks:
        have = socks.info.max_entries
    if have != capacity:
        raise EnvironmentProblem(
            f"group {group!r} in {label} is already loaded with {have} listener slots,"
            f" not {capacity}; unload it first to change that"
        )
    with sysbpf.BpfProg.open_pinned(os.path.join(pin_dir, "prog")) as prog:
        return prog.info().id


def load_group(
    group: str,
    *,
    netns: str | None = None,
    bpffs: str = DEFAULT_BPFFS,
    max_listeners: int = 64,
    drop_when_no_target: bool = False,
    source: Path = BPF_SOURCE,
) -> LoadResult:
    """Compile and pin the program and maps of ``group``; idempotent.

    Loading a group that is already pinned with the same capacity changes
    nothing (its live policy and counters are kept).
    """
    check_group_name(group)
    if not 1 <= max_listeners <= MAX_CAPACITY:
        raise EnvironmentProblem(f"max_listeners must be within 1..{MAX_CAPACITY}")
    label = netns_label(netns)
    if not os.path.isabs(bpffs):
        raise EnvironmentProblem(f"bpffs path must be absolute, got {bpffs!r}")
    with _mount_lock(bpffs):
        mounted = ensure_bpffs(bpffs)
        stale = tuple(remove_stale_staging(bpffs))
        final = group_pin_dir(bpffs, label, group)
        if os.path.isdir(final):
            prog_id = _existing(final, group, label, max_listeners)
            return LoadResult(
                group, label, final, max_listeners, prog_id, 0.0, mounted, True, stale
            )
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f"{group}{STAGING_INFIX}{os.getpid()}")
        with _staging_dir(staging):
            prog_id, seconds = _compile_and_pin(
                staging, source, max_listeners, drop_when_no_target=drop_when_no_target
            )
            _pause_for_tests(staging)
            try:
                os.rename(staging, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise KernelError(f"move pins into {final}", str(exc), exc.errno) from None
                # Loaded meanwhile through another path to the same bpffs: keep theirs.
                _remove_pins(staging)
                prog_id = _existing(final, group, label, max_listeners)
                return LoadResult(
                    group, label, final, max_listeners, prog_id, 0.0, mounted, True, stale
                )
    return LoadResult(group, label, final, max_listeners, prog_id, seconds, mounted, False, stale)


@contextlib.contextmanager
def _staging_dir(staging: str) -> Iterator[None]:
    """Create ``staging`` and hold its flock; remove it unless it was renamed away."""
    os.mkdir(staging)
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # Held until we exit: proves to remove_stale_staging that we are alive.
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    except BaseException:
        _remove_pins(staging)
        raise
    finally:
        os.close(fd)


def _pause_for_tests(staging: str) -> None:
    path = os.environ.get(TEST_PAUSE_ENV)
    if not path:
        return
    with open(f"{path}.tmp", "w") as f:
        f.write(staging)
    os.replace(f"{path}.tmp", path)
    while True:
        signal.pause()  # until a test kills us


def _compile_and_pin(
    pin_dir: str, source: Path, capacity: int, *, drop_when_no_target: bool
) -> tuple[int, float]:
    _kernel_source()
    try:
        from bcc import BPF
        from bcc.libbcc import lib
    except ImportError as exc:
        raise EnvironmentProblem(
            f"cannot import bcc ({exc}); install python3-bpfcc and run 'make setup'"
        ) from None

    lib.bcc_create_map.restype = ct.c_int
    lib.bcc_create_map.argtypes = [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]
    # bcc 0.26 cannot declare a REUSEPORT_SOCKARRAY in C: create it here and
    # hand its fd to the C code as a macro (referenced with bpf_pseudo_fd).
    socks_fd = lib.bcc_create_map(
        sysbpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, b"socks", 4, 8, capacity, 0
    )
    if socks_fd < 0:
        err = ct.get_errno()
        raise UnsupportedError(
            f"the kernel refused to create a REUSEPORT_SOCKARRAY map: {os.strerror(err)}"
        )
    started = time.monotonic()
    bpf = None
    try:
        try:
            bpf = BPF(
                src_file=str(source).encode(),
                cflags=[f"-DSOCKS_FD={socks_fd}", f"-DMAX_SLOTS={capacity}"],
            )
        except Exception as exc:
            raise EnvironmentProblem(f"cannot compile {source}: {exc}") from None
        try:
            fn = bpf.load_func(
                _FUNC, sysbpf.BPF_PROG_TYPE_SK_REUSEPORT, attach_type=_ATTACH_SELECT_OR_MIGRATE
            )
        except Exception as exc:
            message = str(exc)
            if "Invalid argument" in message:
                raise UnsupportedError(
                    "the kernel refused an SK_REUSEPORT program with attach type"
                    f" SELECT_OR_MIGRATE (needs Linux >= 5.14): {message}"
                ) from None
            raise KernelError("load reuseport program", message) from None
        seconds = time.monotonic() - started

        fds = {"prog": fn.fd, "socks": socks_fd}
        fds.update({name: bpf[name.encode()].map_fd for name in _C_MAPS})
        # Start with an empty target table and the group's flags, live index 0.
        flags = 1 if drop_when_no_target else 0
        ctl = sysbpf.BpfMap(os.dup(fds["ctl"]))
        with ctl:
            ctl.update(struct.pack("<I", 0), struct.pack("<II", 0, flags))
        policy = sysbpf.BpfMap(os.dup(fds["policy"]))
        with policy:
            empty = struct.pack("<IIII", 0, 0, flags, 0) + bytes(4 * capacity)
            for idx in (0, 1):
                policy.update(struct.pack("<I", idx), empty)
        for name, fd in fds.items():
            sysbpf.obj_pin(fd, os.path.join(pin_dir, name))
        with sysbpf.BpfProg(os.dup(fn.fd)) as prog:
            prog_id = prog.info().id
        return prog_id, seconds
    finally:
        if bpf is not None:
            bpf.cleanup()  # closes bcc's fds; the pins keep the objects alive
        os.close(socks_fd)


def _remove_pins(pin_dir: str) -> None:
    for name in PIN_NAMES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pin_dir, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(pin_dir)


def unload_group(
    group: str, *, netns: str | None = None, bpffs: str = DEFAULT_BPFFS
) -> UnloadResult:
    """Remove the pins of ``group``.

    A program attached to a live reuseport group stays attached (the group
    holds a reference) with its last policy until the group's last listener
    closes; ``live_listeners`` says how many registered listeners remain.
    """
    check_group_name(group)
    label = netns_label(netns)
    require_bpffs(bpffs)
    with _mount_lock(bpffs):
        stale = tuple(remove_stale_staging(bpffs))
        pin_dir = group_pin_dir(bpffs, label, group)
        if not os.path.isdir(pin_dir):
            unmounted = _remove_empty_dirs(bpffs, label)
            note = f"; removed {', '.join(stale)}, left by a load that died" if stale else ""
            raise EnvironmentProblem(
                f"reuseport group {group!r} is not loaded in {label} (no {pin_dir}){note}"
                + ("; unmounted the bpffs that load had mounted" if unmounted else "")
            )
        live = 0
        socks_pin = os.path.join(pin_dir, "socks")
        if os.path.exists(socks_pin):
            with sysbpf.BpfMap.open_pinned(socks_pin) as socks:
                for slot in range(socks.info.max_entries):
                    if socks.lookup(struct.pack("<I", slot)) is not None:
                        live += 1
        _remove_pins(pin_dir)
        unmounted = _remove_empty_dirs(bpffs, label)
    return UnloadResult(group, label, pin_dir, live, unmounted, stale)


def _remove_empty_dirs(bpffs: str, label: str) -> bool:
    """Drop the namespace and root directories once empty, then a mount we made."""
    for path in (os.path.join(bpffs, PIN_ROOT, label), os.path.join(bpffs, PIN_ROOT)):
        try:
            os.rmdir(path)
        except OSError:
            return False
    return _unmount_if_ours_and_unused(bpffs)

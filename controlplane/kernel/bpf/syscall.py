"""Raw bpf(2) and the few socket/mount syscalls around it, through ctypes.

Services use pinned maps through this module instead of bcc: importing bcc
maps LLVM (~70 MB) and needs kernel headers, while everything a running
service does (open a pin, read or write a map element, attach a program to a
socket) is a handful of syscalls.

Only x86_64 syscall numbers are filled in; other architectures fail early with
:class:`UnsupportedError`.
"""

from __future__ import annotations

import ctypes as ct
import errno as _errno
import os
import platform
from dataclasses import dataclass
from typing import Self, TypeVar

from controlplane.errors import EnvironmentProblem, KernelError, UnsupportedError
from controlplane.kernel.handles import OwnedFd

__all__ = [
    "BPF_ANY",
    "BPF_MAP_TYPE_ARRAY",
    "BPF_MAP_TYPE_HASH",
    "BPF_MAP_TYPE_REUSEPORT_SOCKARRAY",
    "BPF_PROG_TYPE_SK_REUSEPORT",
    "PINNED",
    "BpfMap",
    "BpfProg",
    "MapInfo",
    "PinnedObjects",
    "ProgInfo",
    "attach_reuseport_prog",
    "is_bpffs",
    "listener_problem",
    "mount_bpffs",
    "obj_get",
    "obj_pin",
    "umount",
]

# Syscall numbers per platform.machine(): x86_64 has its own table
# (asm/unistd_64.h); aarch64 uses the generic one (asm-generic/unistd.h).
# pidfd_getfd came after the tables were unified, so it is 438 everywhere.
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_SYS_PIDFD_GETFD = {"x86_64": 438, "aarch64": 438}

# enum bpf_cmd
_MAP_LOOKUP_ELEM = 1
_MAP_UPDATE_ELEM = 2
_MAP_DELETE_ELEM = 3
_MAP_GET_NEXT_KEY = 4
_OBJ_PIN = 6
_OBJ_GET = 7
_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_PROG_TYPE_SK_REUSEPORT = 21

_BPF_FS_MAGIC = 0xCAFE4A11
_MNT_DETACH = 2

_SOL_SOCKET = 1
_SO_TYPE = 3
_SO_REUSEPORT = 15
_SO_ACCEPTCONN = 30
_SO_PROTOCOL = 38
_SO_ATTACH_REUSEPORT_EBPF = 52
_SOCK_STREAM = 1
_IPPROTO_TCP = 6

_libc = ct.CDLL(None, use_errno=True)


def syscall_number(table: dict[str, int]) -> int:
    machine = platform.machine()
    try:
        return table[machine]
    except KeyError:
        known = ", ".join(sorted(table))
        raise UnsupportedError(
            f"bpf(2) wrapper: no syscall numbers for architecture {machine!r} (known: {known})"
        ) from None


class _MapElemAttr(ct.Structure):
    _fields_ = (
        ("map_fd", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("key", ct.c_uint64),
        ("value", ct.c_uint64),
        ("flags", ct.c_uint64),
    )


class _ObjAttr(ct.Structure):
    _fields_ = (
        ("pathname", ct.c_uint64),
        ("bpf_fd", ct.c_uint32),
        ("file_flags", ct.c_uint32),
    )


class _InfoAttr(ct.Structure):
    _fields_ = (
        ("bpf_fd", ct.c_uint32),
        ("info_len", ct.c_uint32),
        ("info", ct.c_uint64),
    )


class _MapInfo(ct.Structure):
    # Prefix of struct bpf_map_info; the kernel copies min(size, its size).
    _fields_ = (
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
    )


class _ProgInfo(ct.Structure):
    # Prefix of struct bpf_prog_info, up to the name.
    _fields_ = (
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    )


def _bpf(cmd: int, attr: ct.Structure) -> int:
    ret: int = _libc.syscall(
        ct.c_long(syscall_number(_SYS_BPF)),
        ct.c_int(cmd),
        ct.byref(attr),
        ct.c_uint(ct.sizeof(attr)),
    )
    if ret < 0:
        return -ct.get_errno()
    return ret


def _fail(operation: str, err: int, payload: object = None) -> KernelError:
    return KernelError(operation, os.strerror(err), errno=err, payload=payload)


_Info = TypeVar("_Info", bound=ct.Structure)


def _obj_info(fd: int, raw: _Info, operation: str) -> _Info:
    """BPF_OBJ_GET_INFO_BY_FD into ``raw`` (a prefix of the kernel's struct:
    the kernel copies what both sizes have in common)."""
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(raw), info=ct.addressof(raw))
    err = _bpf(_OBJ_GET_INFO_BY_FD, attr)
    if err < 0:
        raise _fail(operation, -err)
    return raw


def obj_get(path: str) -> int:
    """Open a pinned object; raises KernelError (errno ENOENT if missing)."""
    raw = os.fsencode(path)
    buf = ct.create_string_buffer(raw)
    attr = _ObjAttr(pathname=ct.addressof(buf))
    fd = _bpf(_OBJ_GET, attr)
    if fd < 0:
        raise _fail(f"open pinned object {path}", -fd)
    return fd


def obj_pin(fd: int, path: str) -> None:
    raw = os.fsencode(path)
    buf = ct.create_string_buffer(raw)
    attr = _ObjAttr(pathname=ct.addressof(buf), bpf_fd=fd)
    err = _bpf(_OBJ_PIN, attr)
    if err < 0:
        raise _fail(f"pin object at {path}", -err)


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str


class _Fd(OwnedFd):
    """A pinned object's descriptor (``path``: where it was opened from)."""

    def __init__(self, fd: int, path: str | None = None) -> None:
        super().__init__(fd)
        self.path = path

    @classmethod
    def open_pinned(cls, path: str) -> Self:
        return cls(obj_get(path), path)


class BpfProg(_Fd):
    def attach_to(self, sock_fd: int) -> None:
        attach_reuseport_prog(sock_fd, self.fileno())

    def info(self) -> ProgInfo:
        raw = _obj_info(self.fileno(), _ProgInfo(), "read program info")
        return ProgInfo(raw.type, raw.id, raw.name.decode(errors="replace"))


class BpfMap(_Fd):
    """A map opened by fd; keys and values are raw bytes of the map's sizes."""

    def __init__(self, fd: int, path: str | None = None) -> None:
        super().__init__(fd, path)
        self._info: MapInfo | None = None

    @property
    def info(self) -> MapInfo:
        if self._info is None:
            raw = _obj_info(self.fileno(), _MapInfo(), "read map info")
            self._info = MapInfo(
                raw.type,
                raw.id,
                raw.key_size,
                raw.value_size,
                raw.max_entries,
                raw.name.decode(errors="replace"),
            )
        return self._info

    def _what(self) -> str:
        return f"map {self.path or self.info.name}"

    def lookup(self, key: bytes) -> bytes | None:
        """The value under ``key``, or None if there is none (ENOENT)."""
        kbuf = ct.create_string_buffer(key, len(key))
        vbuf = ct.create_string_buffer(self.info.value_size)
        attr = _MapElemAttr(map_fd=self.fileno(), key=ct.addressof(kbuf), value=ct.addressof(vbuf))
        err = _bpf(_MAP_LOOKUP_ELEM, attr)
        if err == -_errno.ENOENT:
            return None
        if err < 0:
            raise _fail(f"look up in {self._what()}", -err, key)
        return vbuf.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        kbuf = ct.create_string_buffer(key, len(key))
        vbuf = ct.create_string_buffer(value, len(value))
        attr = _MapElemAttr(
            map_fd=self.fileno(), key=ct.addressof(kbuf), value=ct.addressof(vbuf), flags=flags
        )
        err = _bpf(_MAP_UPDATE_ELEM, attr)
        if err < 0:
            raise _fail(f"update {self._what()}", -err, (key, value))

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        kbuf = ct.create_string_buffer(key, len(key))
        attr = _MapElemAttr(map_fd=self.fileno(), key=ct.addressof(kbuf))
        err = _bpf(_MAP_DELETE_ELEM, attr)
        if err == -_errno.ENOENT:
            return False
        if err < 0:
            raise _fail(f"delete from {self._what()}", -err, key)
        return True

    def all_keys(self) -> list[bytes]:
        """All keys (hash maps); a snapshot, so concurrent writers may race it."""
        out: list[bytes] = []
        size = self.info.key_size
        nbuf = ct.create_string_buffer(size)
        prev: ct.Array[ct.c_char] | None = None
        while True:
            attr = _MapElemAttr(
                map_fd=self.fileno(),
                key=0 if prev is None else ct.addressof(prev),
                value=ct.addressof(nbuf),
            )
            err = _bpf(_MAP_GET_NEXT_KEY, attr)
            if err == -_errno.ENOENT:
                return out
            if err < 0:
                raise _fail(f"iterate {self._what()}", -err)
            out.append(nbuf.raw)
            prev = ct.create_string_buffer(nbuf.raw, size)


# --- sockets --------------------------------------------------------------


def _getsockopt_int(fd: int, level: int, opt: int) -> int:
    val = ct.c_int(0)
    size = ct.c_uint32(ct.sizeof(val))
    if _libc.getsockopt(fd, level, opt, ct.byref(val), ct.byref(size)) != 0:
        err = ct.get_errno()
        raise _fail(f"getsockopt({opt}) on fd {fd}", err)
    return val.value


def listener_problem(fd: int) -> str | None:
    """Why ``fd`` cannot join a reuseport sockarray, or None if it can.

    The kernel answers EINVAL for all of these; checking first lets us say
    which rule was broken.
    """
    try:
        sock_type = _getsockopt_int(fd, _SOL_SOCKET, _SO_TYPE)
    except KernelError as exc:
        if exc.errno == _errno.ENOTSOCK:
            return f"fd {fd} is not a socket"
        if exc.errno == _errno.EBADF:
            return f"fd {fd} is not open"
        raise
    if sock_type != _SOCK_STREAM or _getsockopt_int(fd, _SOL_SOCKET, _SO_PROTOCOL) != (
        _IPPROTO_TCP
    ):
        return "not a TCP socket (listener migration is TCP only)"
    if not _getsockopt_int(fd, _SOL_SOCKET, _SO_REUSEPORT):
        return "SO_REUSEPORT is not set; set it before bind()"
    if not _getsockopt_int(fd, _SOL_SOCKET, _SO_ACCEPTCONN):
        return "socket is not listening; call listen() before registering it"
    return None


def attach_reuseport_prog(sock_fd: int, prog_fd: int) -> None:
    """Attach ``prog_fd`` to the whole reuseport group ``sock_fd`` belongs to.

    The kernel keeps the program on the group, not the socket, and replaces
    whatever was attached before; attaching the same program again is harmless.
    """
    val = ct.c_int(prog_fd)
    if (
        _libc.setsockopt(
            sock_fd, _SOL_SOCKET, _SO_ATTACH_REUSEPORT_EBPF, ct.byref(val), ct.sizeof(val)
        )
        != 0
    ):
        err = ct.get_errno()
        raise _fail("attach program to reuseport group (SO_ATTACH_REUSEPORT_EBPF)", err)


# --- bpffs ----------------------------------------------------------------


def is_bpffs(path: str) -> bool:
    """True if ``path`` is on a bpf filesystem (False if missing or another fs)."""
    buf = ct.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return False
    f_type = int.from_bytes(buf.raw[:8], "little", signed=True)
    return f_type == _BPF_FS_MAGIC


def mount_bpffs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", ct.c_ulong(0), b"mode=0700") != 0:
        err = ct.get_errno()
        raise EnvironmentProblem(
            f"cannot mount bpffs at {path}: {os.strerror(err)}"
            + (" (need root, CAP_SYS_ADMIN)" if err == _errno.EPERM else "")
        )


class PinnedObjects:
    """Opens pinned objects with BPF_OBJ_GET (the real ``BpfMapsPort``)."""

    def open_map(self, path: str) -> BpfMap:
        return BpfMap.open_pinned(path)

    def open_prog(self, path: str) -> BpfProg:
        return BpfProg.open_pinned(path)


PINNED = PinnedObjects()


def umount(path: str) -> None:
    """Detach the mount at ``path`` (lazily: open pins and fds keep their objects)."""
    if _libc.umount2(os.fsencode(path), ct.c_int(_MNT_DETACH)) != 0:
        err = ct.get_errno()
        raise EnvironmentProblem(f"cannot unmount {path}: {os.strerror(err)}")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate ``target_fd`` of the process behind ``pidfd`` into ours."""
    ret: int = _libc.syscall(
        ct.c_long(syscall_number(_SYS_PIDFD_GETFD)),
        ct.c_int(pidfd),
        ct.c_int(target_fd),
        ct.c_uint(0),
    )
    if ret < 0:
        err = ct.get_errno()
        raise _fail(f"pidfd_getfd(fd {target_fd})", err)
    return ret

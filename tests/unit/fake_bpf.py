"""In-memory BPF objects implementing :mod:`controlplane.kernel.bpf.ports`.

Faithful where the reuseport library depends on the kernel, with the
production :class:`KernelError` and the kernel's errno (checked against the
real kernel by ``tests/netns/test_reuseport_fake_parity.py``):

- ARRAY: every index exists, zero-filled; lookup past the end is absent
  (ENOENT), update past the end E2BIG, delete EINVAL.
- HASH: lookup/delete of a missing key ENOENT, a new key past max_entries E2BIG.
- REUSEPORT_SOCKARRAY: update takes a socket fd (u64) and refuses what the
  kernel refuses: a closed fd EBADF, a non-socket ENOTSOCK, a socket that is
  not a listening SO_REUSEPORT one EINVAL, a socket already in a sockarray
  EBUSY; index past the end E2BIG. A listener that closes leaves the array by
  itself. Lookup returns an 8-byte cookie.
- Opening a pin that does not exist: ENOENT; a pin in ``denied``: EACCES.

Sockets are real (a unit test can open listening TCP sockets without root);
only the maps are fakes. A socket counts as closed once no fd of this process
refers to it any more (/proc/self/fd), which is when the kernel drops it.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
from dataclasses import dataclass, field

from controlplane.errors import KernelError
from controlplane.kernel.bpf import syscall as sysbpf
from controlplane.kernel.bpf.syscall import MapInfo, ProgInfo

_ids = itertools.count(1)
# Socket inode -> the sockarray slot holding it, across all fake maps (the
# kernel allows a socket in one sockarray only).
_IN_SOCKARRAY: dict[int, tuple[int, int]] = {}


def _fail(operation: str, err: int) -> KernelError:
    return KernelError(operation, os.strerror(err), errno=err)


def _open_socket_inodes() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


@dataclass
class FakeMap:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str = ""
    data: dict[bytes, bytes] = field(default_factory=dict)
    id: int = field(default_factory=lambda: next(_ids))
    closed: bool = False
    writes: int = 0

    @property
    def info(self) -> MapInfo:
        return MapInfo(
            self.map_type, self.id, self.key_size, self.value_size, self.max_entries, self.name
        )

    def _index(self, key: bytes) -> int:
        assert len(key) == self.key_size == 4
        return int(struct.unpack("<I", key)[0])

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("file descriptor already closed")

    def _sock_live(self, key: bytes) -> bool:
        ino = self.data.get(key)
        if ino is None:
            return False
        if int.from_bytes(ino, "little") in _open_socket_inodes():
            return True
        # The listener closed: the kernel takes it out of the array.
        del self.data[key]
        _IN_SOCKARRAY.pop(int.from_bytes(ino, "little"), None)
        return False

    def lookup(self, key: bytes) -> bytes | None:
        self._check_open()
        if self.map_type == sysbpf.BPF_MAP_TYPE_ARRAY:
            idx = self._index(key)
            if idx >= self.max_entries:
                return None
            return self.data.get(key, bytes(self.value_size))
        if self.map_type == sysbpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY:
            if not self._sock_live(key):
                return None
            return struct.pack("<Q", 0x1000 + self._index(key))  # a cookie
        return self.data.get(key)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self._check_open()
        what = f"update map {self.name}"
        if len(key) != self.key_size or len(value) != self.value_size:
            raise _fail(what, errno.EINVAL)
        if self.map_type == sysbpf.BPF_MAP_TYPE_HASH:
            if key not in self.data and len(self.data) >= self.max_entries:
                raise _fail(what, errno.E2BIG)
            self.data[key] = value
        elif self.map_type == sysbpf.BPF_MAP_TYPE_ARRAY:
            if self._index(key) >= self.max_entries:
                raise _fail(what, errno.E2BIG)
            self.data[key] = value
        else:
            self._update_sockarray(what, key, value)
        self.writes += 1

    def _update_sockarray(self, what: str, key: bytes, value: bytes) -> None:
        idx = self._index(key)
        if idx >= self.max_entries:
            raise _fail(what, errno.E2BIG)
        fd = int(struct.unpack("<Q", value)[0])
        try:
            ino = os.fstat(fd).st_ino
        except OSError:
            raise _fail(what, errno.EBADF) from None
        try:
            problem = sysbpf.listener_problem(fd)
        except KernelError as exc:
            raise _fail(what, exc.errno or errno.EINVAL) from None
        if problem is not None:
            raise _fail(what, errno.ENOTSOCK if "not a socket" in problem else errno.EINVAL)
        holder = _IN_SOCKARRAY.get(ino)
        if holder is not None and ino in _open_socket_inodes():
            raise _fail(what, errno.EBUSY)
        old = self.data.get(key)
        if old is not None:
            _IN_SOCKARRAY.pop(int.from_bytes(old, "little"), None)
        self.data[key] = ino.to_bytes(8, "little")
        _IN_SOCKARRAY[ino] = (self.id, idx)

    def delete(self, key: bytes) -> bool:
        self._check_open()
        if self.map_type == sysbpf.BPF_MAP_TYPE_ARRAY:
            raise _fail(f"delete from map {self.name}", errno.EINVAL)
        if self.map_type == sysbpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY:
            if self._index(key) >= self.max_entries:
                raise _fail(f"delete from map {self.name}", errno.E2BIG)
            if not self._sock_live(key):
                return False
            _IN_SOCKARRAY.pop(int.from_bytes(self.data.pop(key), "little"), None)
            return True
        return self.data.pop(key, None) is not None

    def all_keys(self) -> list[bytes]:
        self._check_open()
        if self.map_type == sysbpf.BPF_MAP_TYPE_HASH:
            return list(self.data)
        return [struct.pack("<I", i) for i in range(self.max_entries)]

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeProg:
    name: str = "select_or_migr"
    id: int = field(default_factory=lambda: next(_ids))
    attached: list[int] = field(default_factory=list)  # socket inodes, in order

    def info(self) -> ProgInfo:
        return ProgInfo(sysbpf.BPF_PROG_TYPE_SK_REUSEPORT, self.id, self.name)

    def attach_to(self, sock_fd: int) -> None:
        try:
            problem = sysbpf.listener_problem(sock_fd)
        except KernelError as exc:
            raise _fail("attach program", exc.errno or errno.EBADF) from None
        if problem is not None:
            raise _fail("attach program", errno.EINVAL)
        self.attached.append(os.fstat(sock_fd).st_ino)

    def close(self) -> None:
        pass


@dataclass
class FakeBpfObjects:
    """A fake bpffs: path -> object. Implements ``BpfMapsPort``."""

    pins: dict[str, FakeMap | FakeProg] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)

    def _get(self, path: str) -> FakeMap | FakeProg:
        if path in self.denied:
            raise _fail(f"open pinned object {path}", errno.EACCES)
        try:
            return self.pins[path]
        except KeyError:
            raise _fail(f"open pinned object {path}", errno.ENOENT) from None

    def open_map(self, path: str) -> FakeMap:
        obj = self._get(path)
        if not isinstance(obj, FakeMap):
            raise _fail(f"open pinned object {path}", errno.EINVAL)
        return obj

    def open_prog(self, path: str) -> FakeProg:
        obj = self._get(path)
        if not isinstance(obj, FakeProg):
            raise _fail(f"open pinned object {path}", errno.EINVAL)
        return obj

    def load_group(self, pin_dir: str, capacity: int = 8, *, drop: bool = False) -> None:
        """The pins 'reuseport load' makes, initialised as the loader does."""
        flags = 1 if drop else 0
        A, H, S = (
            sysbpf.BPF_MAP_TYPE_ARRAY,
            sysbpf.BPF_MAP_TYPE_HASH,
            sysbpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
        )
        maps = {
            "socks": FakeMap(S, 4, 8, capacity, "socks"),
            "slot_gen": FakeMap(A, 4, 4, capacity, "slot_gen"),
            "gen_state": FakeMap(H, 4, 4, 1024, "gen_state"),
            "policy": FakeMap(A, 4, 16 + 4 * capacity, 2, "policy"),
            "ctl": FakeMap(A, 4, 8, 1, "ctl"),
            "counters": FakeMap(A, 4, 8, 5, "counters"),
        }
        maps["ctl"].update(struct.pack("<I", 0), struct.pack("<II", 0, flags))
        empty = struct.pack("<IIII", 0, 0, flags, 0) + bytes(4 * capacity)
        for idx in (0, 1):
            maps["policy"].update(struct.pack("<I", idx), empty)
        self.pins[f"{pin_dir}/prog"] = FakeProg()
        for name, m in maps.items():
            m.writes = 0
            self.pins[f"{pin_dir}/{name}"] = m

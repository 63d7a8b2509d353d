"""tests/unit/fake_bpf.py fails where the kernel fails: the same operations on
real pinned maps and on the fake give the same values and the same errnos."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from controlplane.errors import KernelError
from controlplane.kernel.bpf import syscall as sysbpf
from controlplane.kernel.bpf.loader import load_group
from controlplane.kernel.bpf.ports import BpfMapsPort
from controlplane.kernel.netns import entered
from tests.netns import test_reuseport_support as sup
from tests.unit.fake_bpf import FakeBpfObjects

CAPACITY = 4


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


def u32(i: int) -> bytes:
    return struct.pack("<I", i)


def outcome(op: Callable[[], object]) -> object:
    """The value, reduced to what both sides can agree on, or the errno name."""
    try:
        value = op()
    except KernelError as exc:
        return errno.errorcode.get(exc.errno or 0, exc.errno)
    if isinstance(value, bytes):
        return ("bytes", len(value))
    return value


def script(objects: BpfMapsPort, pin_dir: str, netns: str) -> list[tuple[str, object]]:
    socks = objects.open_map(f"{pin_dir}/socks")
    slot_gen = objects.open_map(f"{pin_dir}/slot_gen")
    gen_state = objects.open_map(f"{pin_dir}/gen_state")
    with entered(netns):
        a = sup.listener(socket.AF_INET)
        idle = socket.socket()
    idle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    r, w = os.pipe()
    os.close(w)
    closed_fd = w
    out: list[tuple[str, object]] = []

    def do(name: str, op: Callable[[], object]) -> None:
        out.append((name, outcome(op)))

    do("open missing pin", lambda: objects.open_map(f"{pin_dir}/nope"))
    do("array lookup", lambda: slot_gen.lookup(u32(0)))
    do("array lookup past end", lambda: slot_gen.lookup(u32(CAPACITY)))
    do("array update past end", lambda: slot_gen.update(u32(CAPACITY), u32(1)))
    do("array delete", lambda: slot_gen.delete(u32(0)))
    do("hash lookup missing", lambda: gen_state.lookup(u32(7)))
    do("hash delete missing", lambda: gen_state.delete(u32(7)))

    def fill() -> None:
        for g in range(1024):
            gen_state.update(u32(g), u32(1))

    do("hash fill", fill)
    do("hash update past max", lambda: gen_state.update(u32(5000), u32(1)))
    do("hash replace when full", lambda: gen_state.update(u32(3), u32(0)))
    do("sockarray not listening", lambda: socks.update(u32(0), struct.pack("<Q", idle.fileno())))
    do("sockarray pipe", lambda: socks.update(u32(0), struct.pack("<Q", r)))
    do("sockarray closed fd", lambda: socks.update(u32(0), struct.pack("<Q", closed_fd)))
    do("sockarray past end", lambda: socks.update(u32(CAPACITY), struct.pack("<Q", a.fileno())))
    do("sockarray add", lambda: socks.update(u32(0), struct.pack("<Q", a.fileno())))
    do("sockarray same socket twice", lambda: socks.update(u32(1), struct.pack("<Q", a.fileno())))
    do("sockarray lookup", lambda: socks.lookup(u32(0)))
    do("sockarray lookup empty", lambda: socks.lookup(u32(1)))
    do("sockarray delete empty", lambda: socks.delete(u32(1)))
    do("sockarray delete past end", lambda: socks.delete(u32(CAPACITY)))
    a.close()
    do("sockarray after close", lambda: socks.lookup(u32(0)))
    idle.close()
    os.close(r)
    return out


def test_fake_maps_fail_like_the_kernel(netns: str, bpffs: str) -> None:
    res = load_group("parity", netns=netns, bpffs=bpffs, max_listeners=CAPACITY)
    real = script(sysbpf.PINNED, res.pin_dir, netns)
    fake_objects = FakeBpfObjects()
    fake_objects.load_group("/fake", CAPACITY)
    fake = script(fake_objects, "/fake", netns)
    assert fake == real
    # ...and the script exercised failures, not only successes.
    assert {v for _, v in real} >= {"ENOENT", "E2BIG", "EINVAL", "EBUSY", "EBADF"}

"""ReuseportGroup's orchestration over the BPF ports, without root: real
listening sockets, fake maps (tests/unit/fake_bpf.py) that fail like the
kernel. The same operations against the real kernel are in tests/netns."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import nullcontext

import pytest

from controlplane.core.reuseport_policy import Target
from controlplane.errors import ConfigError, EnvironmentProblem, KernelError
from controlplane.reuseport import Counters, ReuseportGroup, _decode_target
from tests.unit.fake_bpf import FakeBpfObjects, FakeMap, FakeProg

PIN = "/fake/offloadctl/host/svc"
CAPACITY = 4


@pytest.fixture
def objects() -> FakeBpfObjects:
    o = FakeBpfObjects()
    o.load_group(PIN, CAPACITY)
    return o


@pytest.fixture
def group(objects: FakeBpfObjects) -> Iterator[ReuseportGroup]:
    with ReuseportGroup.from_objects("svc", "host", PIN, objects, lock=nullcontext) as g:
        yield g


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """Five SO_REUSEPORT listeners on one port of 127.0.0.1 (no root needed)."""
    socks: list[socket.socket] = []
    port = 0
    for _ in range(5):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        s.listen(8)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def fake_map(objects: FakeBpfObjects, name: str) -> FakeMap:
    m = objects.pins[f"{PIN}/{name}"]
    assert isinstance(m, FakeMap)
    return m


def live_target(objects: FakeBpfObjects) -> Target:
    """What the BPF program would read now: the table ctl points at."""
    ctl = fake_map(objects, "ctl").lookup(struct.pack("<I", 0))
    assert ctl is not None
    live = struct.unpack("<II", ctl)[0]
    raw = fake_map(objects, "policy").lookup(struct.pack("<I", live))
    assert raw is not None
    return _decode_target(raw, CAPACITY)


def slot_gens(objects: FakeBpfObjects) -> list[int]:
    m = fake_map(objects, "slot_gen")
    raw = [m.lookup(struct.pack("<I", i)) or bytes(4) for i in range(CAPACITY)]
    return [struct.unpack("<I", r)[0] for r in raw]


def in_sockarray(objects: FakeBpfObjects) -> list[int]:
    socks = fake_map(objects, "socks")
    return [i for i in range(CAPACITY) if socks.lookup(struct.pack("<I", i)) is not None]


def test_restart_dance_writes_what_the_program_reads(
    objects: FakeBpfObjects, group: ReuseportGroup, listeners: list[socket.socket]
) -> None:
    a, b, c = listeners[:3]
    assert [group.register(a, 1), group.register(b, 1)] == [0, 1]
    assert live_target(objects) == Target()  # registered, not active yet
    group.activate(1)
    assert live_target(objects) == Target(1, (0, 1))
    prog = objects.pins[f"{PIN}/prog"]
    assert isinstance(prog, FakeProg) and len(prog.attached) == 2

    assert group.register(c, 2) == 2
    group.activate(2)
    assert live_target(objects) == Target(2, (2,))
    assert group.retire(1) == (0, 1)
    assert slot_gens(objects) == [0, 0, 2, 0]
    assert in_sockarray(objects) == [2], "retired listeners leave the sockarray at once"
    st = group.status()
    assert st.target_generation == 2
    assert [(g.generation, g.active, g.target, g.slots) for g in st.generations] == [
        (2, True, True, (2,))
    ]
    assert group.retire(1) == ()  # idempotent


def test_a_closed_listener_leaves_and_an_older_active_generation_takes_over(
    objects: FakeBpfObjects, group: ReuseportGroup, listeners: list[socket.socket]
) -> None:
    old, new = listeners[:2]
    group.register(old, 1)
    group.register(new, 2)
    group.activate(1)
    group.activate(2)
    assert live_target(objects) == Target(2, (1,))
    new.close()
    group.sync()
    assert live_target(objects) == Target(1, (0,))
    assert dict(group.state().slots) == {0: 1}


def test_an_unchanged_target_is_not_rewritten(
    objects: FakeBpfObjects, group: ReuseportGroup, listeners: list[socket.socket]
) -> None:
    group.register(listeners[0], 1)
    group.activate(1)
    policy, ctl = fake_map(objects, "policy"), fake_map(objects, "ctl")
    before = (policy.writes, ctl.writes)
    group.activate(1)
    group.sync()
    assert (policy.writes, ctl.writes) == before


def test_register_refusals_leave_nothing_behind(
    group: ReuseportGroup, listeners: list[socket.socket]
) -> None:
    s = listeners[0]
    assert group.register(s, 1) == 0
    with pytest.raises(KernelError, match="already registered") as exc:
        group.register(s, 2)
    assert exc.value.errno == 16  # EBUSY
    with socket.socket() as idle, pytest.raises(KernelError, match="not listening"):
        idle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        group.register(idle, 2)
    assert dict(group.state().slots) == {0: 1}


def test_full_group(group: ReuseportGroup, listeners: list[socket.socket]) -> None:
    for s in listeners[:CAPACITY]:
        group.register(s, 1)
    with pytest.raises(EnvironmentProblem, match="all 4 listener slots are taken"):
        group.register(listeners[CAPACITY], 1)
    with pytest.raises(ConfigError, match="no registered listeners"):
        group.activate(9)


def test_counters_are_read_from_the_map(objects: FakeBpfObjects, group: ReuseportGroup) -> None:
    counters = fake_map(objects, "counters")
    for idx, value in enumerate((7, 3, 2, 1, 5)):
        counters.update(struct.pack("<I", idx), struct.pack("<Q", value))
    c = group.counters()
    assert c == Counters(7, 3, 2, 1, 5) and c.migrated == 5


def test_open_says_which_problem(objects: FakeBpfObjects) -> None:
    objects.denied.add(f"{PIN}/socks")
    with pytest.raises(EnvironmentProblem, match=r"permission denied .*reuseport receive"):
        ReuseportGroup.from_objects("svc", "host", PIN, objects)
    objects.denied.clear()
    del objects.pins[f"{PIN}/counters"]
    with pytest.raises(EnvironmentProblem, match="is incomplete"):
        ReuseportGroup.from_objects("svc", "host", PIN, objects)
    objects.pins[f"{PIN}/counters"] = FakeMap(2, 4, 4, 5, "counters")  # u32, not u64
    with pytest.raises(EnvironmentProblem, match="counters is not the map this version expects"):
        ReuseportGroup.from_objects("svc", "host", PIN, objects)


def test_register_generation_takes_the_next_number_for_all_its_listeners(
    group: ReuseportGroup, listeners: list[socket.socket]
) -> None:
    assert group.register_generation(listeners[:2]) == (1, (0, 1))
    group.activate(1)
    assert group.register_generation(listeners[2:3]) == (2, (2,))
    assert dict(group.state().slots) == {0: 1, 1: 1, 2: 2}


def test_register_generation_that_fails_leaves_nothing_behind(
    objects: FakeBpfObjects, group: ReuseportGroup, listeners: list[socket.socket]
) -> None:
    group.register(listeners[0], 1)
    # The third listener does not fit (capacity 4): the first two are taken out again.
    with pytest.raises(EnvironmentProblem, match="slots are taken"):
        group.register_generation(listeners[1:5])
    assert dict(group.state().slots) == {0: 1}
    assert in_sockarray(objects) == [0]

"""Service-facing API for zero-reset restarts behind SO_REUSEPORT.

A service restart, generation by generation::

    group = ReuseportGroup.open("web")          # pins made by 'offloadctl reuseport load'
    for sock in new_listeners:                  # bound with SO_REUSEPORT, listening
        group.register(sock, generation=7)
    group.activate(7)                           # new connections now go to 7
    group.retire(6)                             # 6 is forgotten, its slots freed
    # ...generation 6 closes its listeners without accepting: its queued
    # connections migrate to 7 instead of being reset.

This module works through the pinned maps with raw syscalls and never
imports bcc, so it costs a service a few file descriptors, not LLVM. All
changes to a group are serialised with an flock on its pin directory, so
several processes (old and new generation, the agent) can share it.

The decisions (which slot, which generation is the target) are made by the
pure :mod:`controlplane.core.reuseport_policy`; this module reads the maps
into a :class:`GroupState`, asks the core, and writes back the difference.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Protocol, Self

from controlplane.core import reuseport_handover as handover
from controlplane.core import reuseport_policy as policy
from controlplane.core.reuseport_policy import GroupState, Target
from controlplane.errors import ControlPlaneError, EnvironmentProblem, KernelError
from controlplane.kernel.bpf import syscall as sysbpf
from controlplane.kernel.bpf.loader import (
    DEFAULT_BPFFS,
    PIN_NAMES,
    group_pin_dir,
    netns_label,
    require_bpffs,
)
from controlplane.kernel.bpf.ports import BpfMapPort, BpfMapsPort, BpfProgPort
from controlplane.kernel.flock import lock_exclusive

__all__ = ["DEFAULT_BPFFS", "Counters", "GenerationStatus", "GroupStatus", "ReuseportGroup"]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CTL = struct.Struct("<II")  # struct ctl_state {live, flags}
_TABLE_HEAD = struct.Struct("<IIII")  # struct target_table {generation, count, flags, reserved}
_FLAG_DROP = 1
_GEN_ACTIVE = 1
# Changes under the group lock are a few map updates; a holder this late is stopped or hung.
GROUP_LOCK_WAIT = 30.0
COUNTER_NAMES = ("selected", "migrated_established", "migrated_request", "dropped", "fallback")


class SupportsFileno(Protocol):
    def fileno(self) -> int: ...


@dataclass(frozen=True)
class Counters:
    """Outcomes of the BPF program since the group was loaded."""

    selected: int = 0  # new connections steered to the target generation
    migrated_established: int = 0  # accept-queue children moved off a closing listener
    migrated_request: int = 0  # half-open requests (and TFO SYN_RECV) moved
    dropped: int = 0  # migrations refused on purpose (drop_when_no_target)
    fallback: int = 0  # no target listener: the kernel picked by hash

    @property
    def migrated(self) -> int:
        return self.migrated_established + self.migrated_request


@dataclass(frozen=True)
class GenerationStatus:
    generation: int
    active: bool
    target: bool
    slots: tuple[int, ...]


@dataclass(frozen=True)
class GroupStatus:
    name: str
    netns: str
    pin_dir: str
    prog_id: int
    capacity: int
    drop_when_no_target: bool
    target_generation: int
    generations: tuple[GenerationStatus, ...]
    counters: Counters

    def to_json(self) -> str:
        data = asdict(self)
        data["listeners"] = sum(len(g.slots) for g in self.generations)
        return json.dumps(data, indent=2, sort_keys=True)


def _encode_target(t: Target, capacity: int) -> bytes:
    flags = _FLAG_DROP if t.drop_when_no_target else 0
    slots = list(t.slots) + [0] * (capacity - len(t.slots))
    return _TABLE_HEAD.pack(t.generation, len(t.slots), flags, 0) + struct.pack(
        f"<{capacity}I", *slots
    )


def _decode_target(raw: bytes, capacity: int) -> Target:
    gen, count, flags, _ = _TABLE_HEAD.unpack_from(raw)
    count = min(count, capacity)
    slots = struct.unpack_from(f"<{count}I", raw, _TABLE_HEAD.size)
    return Target(gen, tuple(slots), bool(flags & _FLAG_DROP))


class ReuseportGroup:
    """One loaded group, opened through its pins. Use :meth:`open`.

    The constructor takes the opened objects, so a test can hand it fakes
    (:mod:`controlplane.kernel.bpf.ports`) and a lock of its own.
    """

    def __init__(
        self,
        name: str,
        netns: str,
        pin_dir: str,
        prog: BpfProgPort,
        maps: Mapping[str, BpfMapPort],
        lock: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.name = name
        self.netns = netns
        self.pin_dir = pin_dir
        self._prog = prog
        self._maps = dict(maps)
        self._lock = lock or self._flock_pin_dir
        self.capacity = self._maps["socks"].info.max_entries

    @classmethod
    def open(
        cls,
        name: str,
        netns: str | None = None,
        bpffs: str = DEFAULT_BPFFS,
        *,
        objects: BpfMapsPort = sysbpf.PINNED,
    ) -> ReuseportGroup:
        """Open group ``name`` of ``netns`` (None: this thread's namespace).

        Raises EnvironmentProblem if bpffs is not mounted at ``bpffs``, the
        group is not loaded there, or this user may not open its pins (which
        is said as such, with the ways out).
        """
        policy.check_group_name(name)
        label = netns_label(netns)
        require_bpffs(bpffs)
        pin_dir = group_pin_dir(bpffs, label, name)
        try:
            os.stat(pin_dir)
        except FileNotFoundError:
            hint = f" --netns {label}" if label != "host" else ""
            raise EnvironmentProblem(
                f"reuseport group {name!r} is not loaded in {label} (no {pin_dir});"
                f" run 'offloadctl reuseport load --name {name}{hint}'"
            ) from None
        except PermissionError:
            raise _permission_problem(name, label, pin_dir, _errno.EACCES) from None
        return cls.from_objects(name, label, pin_dir, objects)

    @classmethod
    def from_objects(
        cls,
        name: str,
        netns: str,
        pin_dir: str,
        objects: BpfMapsPort,
        lock: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> ReuseportGroup:
        """Open the pins under ``pin_dir`` through ``objects`` and check their layout."""
        opened: list[BpfMapPort | BpfProgPort] = []
        try:
            prog = objects.open_prog(os.path.join(pin_dir, "prog"))
            opened.append(prog)
            maps: dict[str, BpfMapPort] = {}
            for pin in PIN_NAMES[1:]:
                maps[pin] = objects.open_map(os.path.join(pin_dir, pin))
                opened.append(maps[pin])
            _check_layout(pin_dir, prog, maps)
        except KernelError as exc:
            for obj in opened:
                obj.close()
            if exc.errno == _errno.ENOENT:
                raise EnvironmentProblem(
                    f"reuseport group {name!r} in {netns} is incomplete ({exc});"
                    f" unload and load it again"
                ) from None
            if exc.errno in (_errno.EACCES, _errno.EPERM):
                raise _permission_problem(name, netns, pin_dir, exc.errno) from None
            raise
        except BaseException:
            for obj in opened:
                obj.close()
            raise
        return cls(name, netns, pin_dir, prog, maps, lock)

    def close(self) -> None:
        self._prog.close()
        for m in self._maps.values():
            m.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- operations ---------------------------------------------------------

    def register(self, sock: SupportsFileno | int, generation: int) -> int:
        """Add a listening SO_REUSEPORT TCP socket to ``generation``; returns its slot.

        Also attaches the program to the socket's reuseport group: the kernel
        keeps a program per group, and a group vanishes with its last
        listener, so every registration (re)attaches rather than trusting an
        earlier attach to still be there.
        """
        policy.check_generation(generation)
        fd = self._listener_fd(sock)
        with self._locked():
            return self._register_locked(fd, generation)

    def register_generation(
        self, socks: Sequence[SupportsFileno | int]
    ) -> tuple[int, tuple[int, ...]]:
        """Register ``socks`` as a new generation, one above every known one.

        The choice and the registrations happen under one lock, so two
        services starting at once cannot take the same number. Returns the
        generation and the slots, in the order of ``socks``.
        """
        fds = [self._listener_fd(s) for s in socks]
        with self._locked():
            _, reconciled, _ = self._read()
            generation = handover.next_generation(reconciled.state)
            slots: list[int] = []
            try:
                for fd in fds:
                    slots.append(self._register_locked(fd, generation))
            except BaseException:
                with contextlib.suppress(ControlPlaneError):
                    self._retire_locked(generation)
                raise
        return generation, tuple(slots)

    def _listener_fd(self, sock: SupportsFileno | int) -> int:
        fd = sock if isinstance(sock, int) else sock.fileno()
        problem = sysbpf.listener_problem(fd)
        if problem is not None:
            raise KernelError(
                f"register listener in reuseport group {self.name!r}", problem, _errno.EINVAL
            )
        return fd

    def _register_locked(self, fd: int, generation: int) -> int:
        raw, reconciled, kernel_target = self._read()
        new, slot = policy.allocate(reconciled.state, generation)
        socks = self._maps["socks"]
        # Evict orphans first: one of them may be the slot we were given.
        for orphan in reconciled.orphans:
            socks.delete(_U32.pack(orphan))
        try:
            socks.update(_U32.pack(slot), _U64.pack(fd))
        except KernelError as exc:
            raise _register_error(self.name, exc) from None
        try:
            self._prog.attach_to(fd)
        except KernelError:
            socks.delete(_U32.pack(slot))
            raise
        self._apply(raw, new, kernel_target, evict=())
        return slot

    def activate(self, generation: int) -> None:
        """Make ``generation`` a target: the newest active one gets new connections."""
        with self._locked():
            raw, reconciled, kernel_target = self._read()
            new = policy.activate(reconciled.state, generation)
            self._apply(raw, new, kernel_target, evict=reconciled.orphans)

    def retire(self, generation: int) -> tuple[int, ...]:
        """Stop targeting ``generation`` and free its slots; returns them. Idempotent.

        Its listeners stay open (that is the service's job); closing them
        afterwards migrates their queued connections to the target.
        """
        with self._locked():
            return self._retire_locked(generation)

    def _retire_locked(self, generation: int) -> tuple[int, ...]:
        raw, reconciled, kernel_target = self._read()
        new, freed = policy.retire(reconciled.state, generation)
        self._apply(raw, new, kernel_target, evict=(*reconciled.orphans, *freed))
        return freed

    def sync(self) -> None:
        """Forget listeners that closed and rewrite the target table accordingly."""
        with self._locked():
            raw, reconciled, kernel_target = self._read()
            self._apply(raw, reconciled.state, kernel_target, evict=reconciled.orphans)

    def counters(self) -> Counters:
        values = []
        for idx in range(len(COUNTER_NAMES)):
            raw = self._maps["counters"].lookup(_U32.pack(idx))
            values.append(0 if raw is None else _U64.unpack(raw)[0])
        return Counters(*values)

    def state(self) -> GroupState:
        """The group as the kernel has it now (closed listeners left out)."""
        with self._locked():
            _, reconciled, _ = self._read()
        return reconciled.state

    def status(self) -> GroupStatus:
        with self._locked():
            _, reconciled, kernel_target = self._read()
        state = reconciled.state
        tgt = kernel_target or Target()
        gens = tuple(
            GenerationStatus(
                generation=g,
                active=g in state.active,
                target=g == tgt.generation,
                slots=state.slots_of(g),
            )
            for g in state.generations()
        )
        return GroupStatus(
            name=self.name,
            netns=self.netns,
            pin_dir=self.pin_dir,
            prog_id=self._prog.info().id,
            capacity=self.capacity,
            drop_when_no_target=state.drop_when_no_target,
            target_generation=tgt.generation,
            generations=gens,
            counters=self.counters(),
        )

    # --- kernel state <-> GroupState ------------------------------------------

    def _locked(self) -> AbstractContextManager[None]:
        return self._lock()

    @contextmanager
    def _flock_pin_dir(self) -> Iterator[None]:
        # bpffs pin files cannot be opened, but the directory can, and flock
        # works on any inode: one lock per group, across processes.
        try:
            fd = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EnvironmentProblem(
                f"reuseport group {self.name!r} in {self.netns} was unloaded ({self.pin_dir}"
                " is gone)"
            ) from None
        except PermissionError:
            raise _permission_problem(self.name, self.netns, self.pin_dir, _errno.EACCES) from None
        try:
            lock_exclusive(
                fd, GROUP_LOCK_WAIT, f"the lock of reuseport group {self.name!r} ({self.pin_dir})"
            )
            yield
        finally:
            os.close(fd)

    def _read(self) -> tuple[GroupState, policy.Reconciled, Target | None]:
        socks, slot_gen = self._maps["socks"], self._maps["slot_gen"]
        slots: dict[int, int] = {}
        live: list[int] = []
        for slot in range(self.capacity):
            key = _U32.pack(slot)
            gen_raw = slot_gen.lookup(key)
            gen = 0 if gen_raw is None else _U32.unpack(gen_raw)[0]
            if gen:
                slots[slot] = gen
            if socks.lookup(key) is not None:
                live.append(slot)
        gen_state = self._maps["gen_state"]
        active = set()
        for key in gen_state.all_keys():
            value = gen_state.lookup(key)
            if value is not None and _U32.unpack(value)[0] & _GEN_ACTIVE:
                active.add(_U32.unpack(key)[0])
        ctl_raw = self._maps["ctl"].lookup(_U32.pack(0))
        live_idx, flags = _CTL.unpack(ctl_raw) if ctl_raw else (0, 0)
        table_raw = self._maps["policy"].lookup(_U32.pack(live_idx & 1))
        kernel_target = None if table_raw is None else _decode_target(table_raw, self.capacity)
        raw = GroupState(
            capacity=self.capacity,
            slots=slots,
            active=frozenset(active),
            drop_when_no_target=bool(flags & _FLAG_DROP),
        )
        return raw, policy.reconcile(raw, live), kernel_target

    def _apply(
        self,
        old: GroupState,
        new: GroupState,
        kernel_target: Target | None,
        *,
        evict: tuple[int, ...],
    ) -> None:
        writes = policy.plan_writes(old, new, kernel_target=kernel_target, evict=evict)
        for slot in writes.evict:
            self._maps["socks"].delete(_U32.pack(slot))
        for slot, gen in writes.slot_gen:
            self._maps["slot_gen"].update(_U32.pack(slot), _U32.pack(gen))
        for gen, is_active in writes.gen_active:
            if is_active:
                self._maps["gen_state"].update(_U32.pack(gen), _U32.pack(_GEN_ACTIVE))
            else:
                self._maps["gen_state"].delete(_U32.pack(gen))
        if writes.target is not None:
            self._write_target(writes.target)

    def _write_target(self, tgt: Target) -> None:
        # Fill the idle table, then flip: the program never reads a table
        # that is being written (array map updates are plain copies).
        ctl = self._maps["ctl"]
        ctl_raw = ctl.lookup(_U32.pack(0))
        live_idx, flags = _CTL.unpack(ctl_raw) if ctl_raw else (0, 0)
        idle = (live_idx & 1) ^ 1
        self._maps["policy"].update(_U32.pack(idle), _encode_target(tgt, self.capacity))
        ctl.update(_U32.pack(0), _CTL.pack(idle, flags))


def _check_layout(pin_dir: str, prog: BpfProgPort, maps: Mapping[str, BpfMapPort]) -> None:
    """Refuse pins that are not the layout this module writes."""
    cap = maps["socks"].info.max_entries
    want = {
        "socks": (sysbpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8),
        "slot_gen": (sysbpf.BPF_MAP_TYPE_ARRAY, 4, 4),
        "gen_state": (sysbpf.BPF_MAP_TYPE_HASH, 4, 4),
        "policy": (sysbpf.BPF_MAP_TYPE_ARRAY, 4, _TABLE_HEAD.size + 4 * cap),
        "ctl": (sysbpf.BPF_MAP_TYPE_ARRAY, 4, _CTL.size),
        "counters": (sysbpf.BPF_MAP_TYPE_ARRAY, 4, 8),
    }
    for pin, (mtype, ksize, vsize) in want.items():
        info = maps[pin].info
        if (info.type, info.key_size, info.value_size) != (mtype, ksize, vsize):
            raise EnvironmentProblem(
                f"{pin_dir}/{pin} is not the map this version expects (type {info.type},"
                f" key {info.key_size} B, value {info.value_size} B); unload and load again"
            )
    if prog.info().type != sysbpf.BPF_PROG_TYPE_SK_REUSEPORT:
        raise EnvironmentProblem(f"{pin_dir}/prog is not an SK_REUSEPORT program")


def _permission_problem(name: str, label: str, pin_dir: str, err: int) -> EnvironmentProblem:
    """Say that permissions, not a missing group, stop this user, and the ways out."""
    if err == _errno.EPERM:
        cause = "the kernel denies bpf() to this user (EPERM"
        try:
            with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
                cause += f"; kernel.unprivileged_bpf_disabled={f.read().strip()}"
        except OSError:
            pass
        cause += "; needs CAP_BPF)"
    else:
        cause = "permission denied on its bpffs pins (EACCES)"
    return EnvironmentProblem(
        f"cannot open reuseport group {name!r} in {label} as uid {os.geteuid()}: {cause};"
        " run the service as root, or hand its listeners to a root agent"
        " ('offloadctl reuseport receive --socket-group GROUP' or 'adopt'), or give the"
        " service's group access"
        f" to {pin_dir} and the bpffs directories above it (chgrp; g+rx on directories,"
        " g+rw on pins)"
    )


def _register_error(group: str, exc: KernelError) -> KernelError:
    what = f"register listener in reuseport group {group!r}"
    if exc.errno == _errno.EBUSY:
        return KernelError(
            what,
            "socket is already registered (in this or another group); a listener can be"
            " in one group only",
            exc.errno,
        )
    if exc.errno == _errno.EINVAL:
        return KernelError(
            what, "the kernel refused the socket (not a listening SO_REUSEPORT socket)", exc.errno
        )
    return KernelError(what, exc.message, exc.errno)

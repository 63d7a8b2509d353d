"""A faithful in-memory nftables table implementing ``NftPort`` (knftables' Fake).

It applies a transaction to a copy and swaps it in only if every operation
succeeded, and fails where the kernel fails, with the production
:class:`KernelError` and the kernel's errno: ENOENT for a missing table (or
one of another handle), chain, counter, object, flowtable or serial element;
EBUSY for deleting a chain, counter, set or flowtable still referenced (or a
non-empty chain); EEXIST for ``create table`` on an existing table, a device
in two flowtables or a chain added twice; EFBIG past 256 devices in one
flowtable; EOPNOTSUPP for redefining a flowtable in place.
Tests can also edit the table "by hand" (``hand_*``) the way an operator would.
"""

from __future__ import annotations

import copy
import errno
from dataclasses import dataclass, field, replace

from controlplane.core import nft
from controlplane.core.plan import (
    Observed,
    ObservedChain,
    ObservedFlowtable,
    ObservedObject,
    ObservedRule,
)
from controlplane.errors import KernelError

MAX_DEVICES = 256


@dataclass
class FakeRule:
    handle: int
    text: str  # as listed
    flowtable: str | None = None
    counter: str | None = None
    jump: str | None = None
    set_ref: str | None = None


@dataclass
class FakeChain:
    handle: int
    definition: tuple[str, str, int, str] | None
    rules: list[FakeRule] = field(default_factory=list)


@dataclass
class FakeTable:
    marker: str | None = None
    flowtables: dict[str, ObservedFlowtable] = field(default_factory=dict)
    chains: dict[str, FakeChain] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    sets: dict[str, int] = field(default_factory=dict)  # hand-added sets: name -> handle
    # other hand-added objects (maps, quotas, ct helpers...): (kind, name) -> handle
    objects: dict[tuple[nft.ObjKind, str], int] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    table_handle: int = 1
    serial: set[int] | None = None
    serial_handle: int = 0
    next_handle: int = 1
    teardowns: int = 0  # flowtable deletions: they tear offloaded flows down

    def handle(self) -> int:
        self.next_handle += 1
        return self.next_handle


def _fail(code: int, what: str) -> KernelError:
    return KernelError("nft transaction", f"{what}: {errno.errorcode[code]}", code)


class FakeNft:
    """One table of a fake kernel (the port is per table)."""

    def __init__(self, flowtables: bool = True) -> None:
        self.table: FakeTable | None = None
        self.supported = flowtables
        self.last: nft.Transaction | None = None
        self.runs = 0
        self.lists = 0
        self.generation = 0  # bumped by every commit and hand edit, like the kernel's
        self.before_run: list[object] = []  # callables run just before a commit
        self.tables_made = 0  # table handles are never reused in a namespace

    # -- NftPort ------------------------------------------------------------------

    def list_table(self, ref: nft.TableRef) -> Observed | None:
        self.lists += 1
        t = self.table
        if t is None:
            return None
        rules = tuple(
            ObservedRule(name, r.handle, r.text) for name, c in t.chains.items() for r in c.rules
        )
        serial = next(iter(t.serial)) if t.serial is not None and len(t.serial) == 1 else None
        return Observed(
            marker=t.marker,
            flowtables=dict(t.flowtables),
            chains={n: ObservedChain(n, c.definition, c.handle) for n, c in t.chains.items()},
            rules=rules,
            counters=dict(t.counters),
            objects=tuple(ObservedObject(nft.ObjKind.SET, n, h) for n, h in sorted(t.sets.items()))
            + tuple(ObservedObject(k, n, h) for (k, n), h in sorted(t.objects.items())),
            serial=serial,
            serial_handle=t.serial_handle if t.serial is not None else None,
            flags=t.flags,
            handle=t.table_handle,
        )

    def show(self, ref: nft.TableRef) -> str | None:
        return None if self.table is None else repr(self.table)

    def flowtables_supported(self) -> tuple[bool, str]:
        return self.supported, "" if self.supported else "no NF_FLOW_TABLE (fake)"

    def run(self, txn: nft.Transaction, check: bool = False) -> None:
        for hook in self.before_run:
            hook()  # type: ignore[operator]
        self.last = txn
        t = copy.deepcopy(self.table)
        for op in txn.ops:
            t = self._apply(t, op)
        if not check:
            self.table = t
            self.runs += 1
            self.generation += 1

    # -- edits "by hand" ----------------------------------------------------------

    def hand_add_chain(self, name: str) -> None:
        assert self.table is not None
        self.generation += 1
        self.table.chains[name] = FakeChain(self.table.handle(), None)

    def hand_add_rule(self, chain: str, text: str, **refs: str) -> None:
        assert self.table is not None
        self.generation += 1
        self.table.chains[chain].rules.append(FakeRule(self.table.handle(), text, **refs))

    def hand_add_set(self, name: str) -> None:
        assert self.table is not None
        self.generation += 1
        self.table.sets[name] = self.table.handle()

    def hand_add_object(self, kind: nft.ObjKind, name: str) -> None:
        assert self.table is not None
        self.generation += 1
        where = {nft.ObjKind.SET: self.table.sets, nft.ObjKind.COUNTER: self.table.counters}
        if kind in where:
            where[kind][name] = self.table.handle()
        else:
            self.table.objects[(kind, name)] = self.table.handle()

    def hand_set_flags(self, *flags: str) -> None:
        assert self.table is not None
        self.generation += 1
        self.table.flags = tuple(sorted(flags))

    def hand_create_table(self, marker: str | None = None) -> None:
        """``nft add table`` by someone else (a new table handle)."""
        assert self.table is None
        self.generation += 1
        self.tables_made += 1
        self.table = FakeTable(marker=marker, table_handle=100 + self.tables_made)

    # -- the kernel's rules -------------------------------------------------------

    def _refs(self, t: FakeTable) -> list[FakeRule]:
        return [r for c in t.chains.values() for r in c.rules]

    def _apply(self, t: FakeTable | None, op: nft.Op) -> FakeTable | None:
        if isinstance(op, nft.CreateTable):
            if t is not None:
                raise _fail(errno.EEXIST, "table exists")
            self.tables_made += 1
            return FakeTable(marker=nft.TABLE_MARKER, table_handle=100 + self.tables_made)
        if t is None:
            raise _fail(errno.ENOENT, "no such table")
        if isinstance(op, nft.DeleteTable):
            if op.handle and op.handle != t.table_handle:
                raise _fail(errno.ENOENT, f"table handle {op.handle}")
            return None
        if isinstance(op, nft.ResetTableFlags):
            t.flags = ()
            return t
        if isinstance(op, nft.AddSerial):
            if t.serial is not None:
                raise _fail(errno.EEXIST, "serial set exists")
            t.serial, t.serial_handle = {op.value}, t.handle()
        elif isinstance(op, nft.SwapSerial):
            if t.serial is None or op.old not in t.serial:
                raise _fail(errno.ENOENT, f"serial element {op.old}")
            t.serial = (t.serial - {op.old}) | {op.new}
        elif isinstance(op, nft.AddCounter):
            t.counters.setdefault(op.name, t.handle())
        elif isinstance(op, nft.DeleteCounter):
            self._delete_counter(t, op.name)
        elif isinstance(op, nft.AddFlowtable):
            self._add_flowtable(t, op.ft)
        elif isinstance(op, nft.DeleteFlowtableDevices):
            cur = t.flowtables.get(op.name)
            if cur is None or not set(op.devices) <= cur.devices:
                raise _fail(errno.ENOENT, "device not in flowtable")
            t.flowtables[op.name] = replace(cur, devices=cur.devices - set(op.devices))
        elif isinstance(op, nft.DeleteFlowtable):
            self._delete_flowtable(t, op.name)
        elif isinstance(op, nft.AddChain):
            if op.chain.name in t.chains:
                raise _fail(errno.EEXIST, f"chain {op.chain.name}")
            t.chains[op.chain.name] = FakeChain(t.handle(), op.chain.definition)
        elif isinstance(op, nft.FlushChain):
            if op.name not in t.chains:
                raise _fail(errno.ENOENT, f"chain {op.name}")
            t.chains[op.name].rules = []
        elif isinstance(op, nft.DeleteChain):
            self._delete_chain(t, op.name)
        elif isinstance(op, nft.DeleteByHandle):
            self._delete_by_handle(t, op)
        elif isinstance(op, nft.AddRule):
            self._add_rule(t, op.rule)
        else:  # pragma: no cover
            raise AssertionError(op)
        return t

    def _add_flowtable(self, t: FakeTable, ft: nft.Flowtable) -> None:
        for other in t.flowtables.values():
            if other.name != ft.name and set(ft.devices) & other.devices:
                raise _fail(errno.EEXIST, "device already in another flowtable")
        cur = t.flowtables.get(ft.name)
        if cur is None:
            new = ObservedFlowtable(
                ft.name, ft.priority, frozenset(ft.devices), ft.hw_offload, ft.counter, t.handle()
            )
        else:
            if cur.definition != ft.definition:
                raise _fail(errno.EOPNOTSUPP, "flowtable redefinition")
            new = ObservedFlowtable(
                ft.name,
                cur.priority,
                cur.devices | set(ft.devices),
                cur.hw_offload,
                cur.counter,
                cur.handle,
            )
        if len(new.devices) > MAX_DEVICES:
            raise _fail(errno.EFBIG, "too many devices in one flowtable")
        t.flowtables[ft.name] = new

    def _delete_flowtable(self, t: FakeTable, name: str) -> None:
        if name not in t.flowtables:
            raise _fail(errno.ENOENT, f"flowtable {name}")
        if any(r.flowtable == name for r in self._refs(t)):
            raise _fail(errno.EBUSY, f"flowtable {name} in use")
        del t.flowtables[name]
        t.teardowns += 1

    def _delete_counter(self, t: FakeTable, name: str) -> None:
        if name not in t.counters:
            raise _fail(errno.ENOENT, f"counter {name}")
        if any(r.counter == name for r in self._refs(t)):
            raise _fail(errno.EBUSY, f"counter {name} in use")
        del t.counters[name]

    def _delete_chain(self, t: FakeTable, name: str) -> None:
        chain = t.chains.get(name)
        if chain is None:
            raise _fail(errno.ENOENT, f"chain {name}")
        if chain.rules or any(r.jump == name for r in self._refs(t)):
            raise _fail(errno.EBUSY, f"chain {name} not empty or referenced")
        del t.chains[name]

    def _delete_by_handle(self, t: FakeTable, op: nft.DeleteByHandle) -> None:
        kind = op.kind
        if kind is nft.ObjKind.CHAIN:
            name = next((n for n, c in t.chains.items() if c.handle == op.handle), None)
            if name is None:
                raise _fail(errno.ENOENT, f"chain handle {op.handle}")
            self._delete_chain(t, name)
        elif kind is nft.ObjKind.COUNTER:
            name = next((n for n, h in t.counters.items() if h == op.handle), None)
            if name is None:
                raise _fail(errno.ENOENT, f"counter handle {op.handle}")
            self._delete_counter(t, name)
        elif kind is nft.ObjKind.FLOWTABLE:
            name = next((n for n, f in t.flowtables.items() if f.handle == op.handle), None)
            if name is None:
                raise _fail(errno.ENOENT, f"flowtable handle {op.handle}")
            self._delete_flowtable(t, name)
        elif kind is nft.ObjKind.SET:
            if t.serial is not None and op.handle == t.serial_handle:
                t.serial = None
                return
            name = next((n for n, h in t.sets.items() if h == op.handle), None)
            if name is None:
                raise _fail(errno.ENOENT, f"set handle {op.handle}")
            if any(r.set_ref == name for r in self._refs(t)):
                raise _fail(errno.EBUSY, f"set {name} in use")
            del t.sets[name]
        elif kind in nft.BY_NAME_ONLY:
            if t.objects.pop((kind, op.name), None) is None:
                raise _fail(errno.ENOENT, f"{kind.value} {op.name}")
        else:
            key = next((k for k, h in t.objects.items() if h == op.handle), None)
            if key is None or key[0] is not kind:
                raise _fail(errno.ENOENT, f"{kind.value} handle {op.handle}")
            del t.objects[key]

    def _add_rule(self, t: FakeTable, rule: nft.Rule) -> None:
        if rule.chain not in t.chains:
            raise _fail(errno.ENOENT, f"chain {rule.chain}")
        ft = rule.flowtable_ref
        if ft is not None and ft not in t.flowtables:
            raise _fail(errno.ENOENT, f"flowtable {ft}")
        counter = next(
            (
                s.json["counter"]
                for s in rule.stmts
                if isinstance(s.json, dict) and isinstance(s.json.get("counter"), str)
            ),
            None,
        )
        if counter is not None and counter not in t.counters:
            raise _fail(errno.ENOENT, f"counter {counter}")
        t.chains[rule.chain].rules.append(
            FakeRule(t.handle(), rule.listed, flowtable=ft, counter=counter)
        )

"""A faithful in-memory nftables table (knftables-style fake) for plan tests.

It applies a transaction to a copy and swaps it in only if every operation
succeeded, and it fails where the kernel fails: deleting a flowtable that a
rule references (EBUSY), adding to a missing chain (ENOENT), redefining an
existing flowtable in place (EEXIST/EOPNOTSUPP), removing absent devices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from controlplane.core import nft
from controlplane.core.plan import Observed, ObservedFlowtable, ObservedRule


class FakeKernelError(Exception):
    pass


@dataclass
class FakeTable:
    flowtables: dict[str, ObservedFlowtable] = field(default_factory=dict)
    chains: dict[str, tuple[str, str, int, str]] = field(default_factory=dict)
    rules: dict[str, list[nft.Rule]] = field(default_factory=dict)
    counters: set[str] = field(default_factory=set)
    # operations that would tear offloaded flows down
    teardowns: int = 0


class FakeNft:
    def __init__(self) -> None:
        self.table: FakeTable | None = None
        self.last: nft.Transaction | None = None

    def observed(self) -> Observed | None:
        t = self.table
        if t is None:
            return None
        rules = tuple(
            ObservedRule(chain, i, r.comment)
            for chain, rs in t.rules.items()
            for i, r in enumerate(rs)
        )
        return Observed(dict(t.flowtables), dict(t.chains), rules, frozenset(t.counters))

    def run(self, txn: nft.Transaction) -> None:
        self.last = txn
        t = copy.deepcopy(self.table)
        for op in txn.ops:
            t = self._apply(t, op)
        self.table = t

    def _apply(self, t: FakeTable | None, op: nft.Op) -> FakeTable | None:
        if isinstance(op, nft.AddTable):
            return t or FakeTable()
        if t is None:
            raise FakeKernelError("ENOENT: no table")
        if isinstance(op, nft.DeleteTable):
            return None
        if isinstance(op, nft.AddCounter):
            t.counters.add(op.name)
        elif isinstance(op, nft.DeleteCounter):
            t.counters.discard(op.name)
        elif isinstance(op, nft.AddFlowtable):
            ft = op.ft
            cur = t.flowtables.get(ft.name)
            if cur is None:
                t.flowtables[ft.name] = ObservedFlowtable(
                    ft.name, ft.priority, frozenset(ft.devices), ft.hw_offload, ft.counter
                )
            else:
                if cur.definition != (ft.priority, ft.hw_offload, ft.counter):
                    raise FakeKernelError("EOPNOTSUPP: flowtable redefinition")
                t.flowtables[ft.name] = ObservedFlowtable(
                    ft.name,
                    cur.priority,
                    cur.devices | set(ft.devices),
                    cur.hw_offload,
                    cur.counter,
                )
        elif isinstance(op, nft.DeleteFlowtableDevices):
            cur = t.flowtables[op.name]
            if not set(op.devices) <= cur.devices:
                raise FakeKernelError("ENOENT: device not in flowtable")
            t.flowtables[op.name] = ObservedFlowtable(
                op.name, cur.priority, cur.devices - set(op.devices), cur.hw_offload, cur.counter
            )
        elif isinstance(op, nft.DeleteFlowtable):
            if any(r.flowtable_ref == op.name for rs in t.rules.values() for r in rs):
                raise FakeKernelError("EBUSY: flowtable in use")
            del t.flowtables[op.name]
            t.teardowns += 1
        elif isinstance(op, nft.AddChain):
            if op.chain.name in t.chains:
                raise FakeKernelError("EEXIST: chain")
            t.chains[op.chain.name] = op.chain.definition
            t.rules[op.chain.name] = []
        elif isinstance(op, nft.FlushChain):
            t.rules[op.name] = []
        elif isinstance(op, nft.DeleteChain):
            if t.rules.get(op.name):
                raise FakeKernelError("EBUSY: chain not empty")
            del t.chains[op.name]
            t.rules.pop(op.name, None)
        elif isinstance(op, nft.AddRule):
            if op.rule.chain not in t.chains:
                raise FakeKernelError("ENOENT: chain")
            ref = op.rule.flowtable_ref
            if ref is not None and ref not in t.flowtables:
                raise FakeKernelError("ENOENT: flowtable")
            t.rules[op.rule.chain].append(op.rule)
        else:  # pragma: no cover
            raise AssertionError(op)
        return t

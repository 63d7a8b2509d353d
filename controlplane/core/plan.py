"""Desired ruleset vs what the kernel has → the smallest safe transaction. Pure.

Rules of the game (why the plan looks the way it does):

- Nothing changes → no operations at all; the kernel is not touched.
- A flowtable whose definition (priority, flags) is unchanged is never deleted:
  deleting it tears down every offloaded flow. Device changes are made on the
  existing flowtable (``add flowtable … { devices }`` / ``delete flowtable …
  { devices }``) inside the same transaction.
- A chain whose rules differ is flushed and refilled in the same transaction
  (offloaded flows survive that); unchanged chains are left alone.
- Rules are recognised by the content hash in their comment; an untagged rule
  in the owned table (someone edited it by hand) makes its chain "changed".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from controlplane.core import nft
from controlplane.errors import PlanError

__all__ = ["FlowtableChange", "Observed", "Plan", "make_plan", "parse_listing"]


@dataclass(frozen=True)
class ObservedFlowtable:
    name: str
    priority: int
    devices: frozenset[str]
    hw_offload: bool = False
    counter: bool = False

    @property
    def definition(self) -> tuple[int, bool, bool]:
        return (self.priority, self.hw_offload, self.counter)


@dataclass(frozen=True)
class ObservedRule:
    chain: str
    handle: int
    comment: str | None

    @property
    def tag(self) -> str | None:
        if self.comment and self.comment.startswith(nft.TAG_PREFIX):
            return self.comment[len(nft.TAG_PREFIX) :].split(" ", 1)[0]
        return None


@dataclass(frozen=True)
class Observed:
    """The owned table as the kernel lists it."""

    flowtables: Mapping[str, ObservedFlowtable] = field(default_factory=dict)
    chains: Mapping[str, tuple[str, str, int, str] | None] = field(default_factory=dict)
    rules: tuple[ObservedRule, ...] = ()
    counters: frozenset[str] = frozenset()

    def rules_of(self, chain: str) -> list[ObservedRule]:
        return [r for r in self.rules if r.chain == chain]

    @property
    def foreign_rules(self) -> list[ObservedRule]:
        return [r for r in self.rules if r.tag is None]


_FT_BLOCK = re.compile(r"flowtable (\S+) \{(.*?)\n\s*\}", re.S)


def parse_listing(doc: Mapping[str, object], text: str | None = None) -> Observed:
    """Parse ``nft -j list table`` output (plus the text listing for flowtable flags,
    which nft 1.0.x's JSON output omits)."""
    flags: dict[str, tuple[bool, bool]] = {}
    if text:
        for name, body in _FT_BLOCK.findall(text):
            flags[name] = ("flags offload" in body, bool(re.search(r"^\s*counter\s*$", body, re.M)))
    fts: dict[str, ObservedFlowtable] = {}
    chains: dict[str, tuple[str, str, int, str] | None] = {}
    rules: list[ObservedRule] = []
    counters: set[str] = set()
    items = doc.get("nftables", [])
    assert isinstance(items, list)
    for item in items:
        if "flowtable" in item:
            f = item["flowtable"]
            dev = f.get("dev", [])
            devices = frozenset([dev] if isinstance(dev, str) else dev)
            hw, cnt = flags.get(f["name"], (False, False))
            fts[f["name"]] = ObservedFlowtable(f["name"], int(f.get("prio", 0)), devices, hw, cnt)
        elif "chain" in item:
            c = item["chain"]
            if "hook" in c:
                chains[c["name"]] = (
                    c["type"],
                    c["hook"],
                    int(c["prio"]),
                    c.get("policy", "accept"),
                )
            else:
                chains[c["name"]] = None
        elif "rule" in item:
            r = item["rule"]
            rules.append(ObservedRule(r["chain"], int(r.get("handle", 0)), r.get("comment")))
        elif "counter" in item:
            counters.add(item["counter"]["name"])
    return Observed(fts, chains, tuple(rules), frozenset(counters))


@dataclass(frozen=True)
class FlowtableChange:
    name: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    created: bool = False
    deleted: bool = False
    recreated: bool = False


@dataclass(frozen=True)
class Plan:
    ref: nft.TableRef
    ops: tuple[nft.Op, ...]
    summary: tuple[str, ...]
    flowtable_changes: tuple[FlowtableChange, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.ops

    @property
    def transaction(self) -> nft.Transaction:
        return nft.Transaction(self.ref, self.ops)

    def devices_leaving_fast_path(self) -> frozenset[str]:
        """Devices removed from a flowtable that stays: the kernel leaves their
        flows offloaded, so the caller must tear those flows down itself."""
        out: set[str] = set()
        for ch in self.flowtable_changes:
            out.update(ch.removed)
        return frozenset(out)


def make_plan(desired: nft.Ruleset, observed: Observed | None) -> Plan:
    ref = nft.TableRef(desired.family, desired.table)
    if observed is None:
        ops = nft.create_ops(desired)
        summary = [f"+ table {ref.spec}"]
        summary += [f"+ counter {c}" for c in desired.counters]
        summary += [
            f"+ flowtable {ft.name} devices {{ {', '.join(ft.devices)} }}"
            for ft in desired.flowtables
        ]
        for c in desired.chains:
            summary.append(f"+ chain {c.name} ({c.type} {c.hook.value} priority {c.priority})")
            summary += [f"    + {r.text}" for r in desired.rules_of(c.name)]
        changes = tuple(
            FlowtableChange(ft.name, added=ft.devices, created=True) for ft in desired.flowtables
        )
        return Plan(ref, tuple(ops), tuple(summary), changes)
    return _diff(ref, desired, observed)


def _diff(ref: nft.TableRef, desired: nft.Ruleset, obs: Observed) -> Plan:
    summary: list[str] = []
    changes: list[FlowtableChange] = []
    # Flowtables that must go away (removed or redefined) first lose the rules
    # that reference them: the kernel refuses to delete a flowtable in use.
    doomed: set[str] = set()
    for name, old in obs.flowtables.items():
        new = desired.flowtable(name)
        if new is None:
            doomed.add(name)
            changes.append(FlowtableChange(name, removed=tuple(sorted(old.devices)), deleted=True))
            summary.append(f"- flowtable {name} (its offloaded flows are torn down)")
        elif new.definition != old.definition:
            doomed.add(name)
            changes.append(FlowtableChange(name, added=new.devices, recreated=True))
            summary.append(
                f"! flowtable {name} recreated: priority/flags changed"
                " (its offloaded flows are torn down)"
            )

    rebuild: list[str] = []
    for chain in desired.chains:
        want_tags = [r.tag for r in desired.rules_of(chain.name)]
        have = obs.rules_of(chain.name)
        # Only forward-hook chains can hold "flow add"; rebuilding them drops
        # any reference (old or new) to a flowtable about to be deleted.
        refs_doomed = bool(doomed) and chain.hook is nft.Hook.FORWARD
        if (
            chain.name in obs.chains
            and obs.chains[chain.name] == chain.definition
            and [r.tag for r in have] == want_tags
            and not refs_doomed
        ):
            continue
        rebuild.append(chain.name)
    removed_chains = [c for c in obs.chains if c not in {ch.name for ch in desired.chains}]

    pre_ops: list[nft.Op] = []  # remove references, then objects
    post_ops: list[nft.Op] = []  # create objects, then rules
    for name in removed_chains:
        pre_ops += [nft.FlushChain(name), nft.DeleteChain(name)]
        summary.append(f"- chain {name}")
    for name in rebuild:
        chain = next(c for c in desired.chains if c.name == name)
        have = obs.rules_of(name)
        if name not in obs.chains:
            post_ops.append(nft.AddChain(chain))
            summary.append(
                f"+ chain {name} ({chain.type} {chain.hook.value} priority {chain.priority})"
            )
        elif obs.chains[name] != chain.definition:
            pre_ops += [nft.FlushChain(name), nft.DeleteChain(name)]
            post_ops.append(nft.AddChain(chain))
            summary.append(f"! chain {name} recreated: hook/type/priority/policy changed")
        else:
            pre_ops.append(nft.FlushChain(name))
            summary.append(f"~ chain {name}: rules replaced")
        new_rules = desired.rules_of(name)
        new_tags = {r.tag for r in new_rules}
        old_tags = {r.tag for r in have}
        summary += [
            f"    - {r.comment or f'rule handle {r.handle} (not ours)'}"
            for r in have
            if r.tag not in new_tags
        ]
        summary += [f"    + {r.text}" for r in new_rules if r.tag not in old_tags]
        post_ops += [nft.AddRule(r) for r in new_rules]

    for name in sorted(doomed):
        pre_ops.append(nft.DeleteFlowtable(name))
    for ft in desired.flowtables:
        cur = obs.flowtables.get(ft.name)
        if cur is None or ft.name in doomed:
            post_ops.insert(0, nft.AddFlowtable(ft))
            if cur is None:
                changes.append(FlowtableChange(ft.name, added=ft.devices, created=True))
                summary.append(f"+ flowtable {ft.name} devices {{ {', '.join(ft.devices)} }}")
            continue
        added = tuple(sorted(set(ft.devices) - cur.devices))
        removed = tuple(sorted(cur.devices - set(ft.devices)))
        if added:
            post_ops.insert(0, nft.AddFlowtable(replace(ft, devices=added)))
            summary.append(f"~ flowtable {ft.name}: + devices {{ {', '.join(added)} }}")
        if removed:
            pre_ops.append(nft.DeleteFlowtableDevices(ft.name, removed))
            summary.append(
                f"~ flowtable {ft.name}: - devices {{ {', '.join(removed)} }}"
                " (their offloaded flows are torn down)"
            )
        if added or removed:
            changes.append(FlowtableChange(ft.name, added=added, removed=removed))

    for name in sorted(obs.counters - set(desired.counters)):
        pre_ops.append(nft.DeleteCounter(name))
        summary.append(f"- counter {name}")
    for name in desired.counters:
        if name not in obs.counters:
            post_ops.insert(0, nft.AddCounter(name))
            summary.append(f"+ counter {name}")

    ops = tuple(pre_ops + post_ops)
    _check_order(ops)
    return Plan(ref, ops, tuple(summary), tuple(changes))


def _check_order(ops: tuple[nft.Op, ...]) -> None:
    """Guard against our own bugs: a rule must never be added before the
    flowtable it references, nor a flowtable deleted after rules re-reference it."""
    created: set[str] = set()
    for op in ops:
        if isinstance(op, nft.AddFlowtable):
            created.add(op.ft.name)
        if isinstance(op, nft.DeleteFlowtable) and op.name in created:
            raise PlanError(f"flowtable {op.name} deleted after being (re)created")

"""Desired ruleset vs what the kernel lists → the smallest safe transaction. Pure.

Rules of the game (why the plan looks the way it does):

- Nothing changes → no operations at all; the kernel is not touched.
- Drift is judged on content: each listed rule (nft's canonical, stateless
  text) is compared with how nft lists the rule we render
  (:attr:`nft.Rule.listed`), never on its ``cp:`` tag alone. A rule edited by
  hand with its tag kept, a hand-added rule, chain, set, counter or jump is a
  difference, and apply puts the declared state back.
- A flowtable whose definition (priority, flags) is unchanged is never
  deleted: deleting it tears down every offloaded flow. Device changes are made
  on the existing flowtable inside the same transaction.
- A chain whose rules differ is flushed and refilled in the same transaction
  (offloaded flows survive that); unchanged chains are left alone.
- Order the kernel accepts: first every reference goes (flush the chains that
  change or go, our own and hand-added ones, so no ``jump``/``goto``/set
  lookup still points anywhere), then hand-added sets and maps (their
  elements may jump to a chain or name a counter), then chains, then the
  other objects (counters, quotas, limits, ct helpers/timeouts/expectations,
  synproxies, secmarks), all by kernel handle (docs/nft-behaviour.md); then
  flowtables lose devices or go, then objects are created and rules added.
- Table flags are declared state: we declare none, so a ``dormant`` table
  (every hook off) is drift that apply clears.
- What cannot be removed piece by piece (listing lines we cannot classify, a
  hand-added object whose name cannot be put into a command, our serial set
  gone) makes apply rebuild the table: delete it by its kernel handle and
  create it afresh, in one transaction (its offloaded flows are torn down,
  and the plan says so).
- Every committing transaction starts by swapping the table's serial
  (:data:`nft.SERIAL_SET`): planned against a listing that another writer has
  since changed, the batch fails as a whole (ENOENT) instead of overwriting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from controlplane.core import nft
from controlplane.errors import PlanError

__all__ = [
    "FlowtableChange",
    "Observed",
    "ObservedChain",
    "ObservedFlowtable",
    "ObservedObject",
    "ObservedRule",
    "Plan",
    "make_plan",
    "parse_listing",
]


@dataclass(frozen=True)
class ObservedFlowtable(nft.FlowtableDefinition):
    name: str
    priority: int
    devices: frozenset[str]
    hw_offload: bool = False
    counter: bool = False
    handle: int = 0


@dataclass(frozen=True)
class ObservedRule:
    chain: str
    handle: int
    text: str  # as nft lists it (stateless), anonymous set elements sorted

    @property
    def comment(self) -> str | None:
        m = _COMMENT.search(self.text)
        return m.group(1) if m else None

    @property
    def tag(self) -> str | None:
        c = self.comment
        if c and c.startswith(nft.TAG_PREFIX):
            return c[len(nft.TAG_PREFIX) :].split(" ", 1)[0]
        return None


@dataclass(frozen=True)
class ObservedChain:
    name: str
    definition: tuple[str, str, int, str] | None  # None: a regular (non-base) chain
    handle: int = 0


@dataclass(frozen=True)
class ObservedObject:
    """A set, map, quota… (anything but chains, flowtables, counters, the serial)."""

    kind: nft.ObjKind
    name: str
    handle: int


@dataclass(frozen=True)
class Observed:
    """A table as the kernel lists it."""

    marker: str | None = None  # the table's comment
    flowtables: Mapping[str, ObservedFlowtable] = field(default_factory=dict)
    chains: Mapping[str, ObservedChain] = field(default_factory=dict)
    rules: tuple[ObservedRule, ...] = ()
    counters: Mapping[str, int] = field(default_factory=dict)  # name -> handle
    objects: tuple[ObservedObject, ...] = ()
    serial: int | None = None
    serial_handle: int | None = None  # the set exists (even if its content is wrong)
    unknown: tuple[str, ...] = ()  # listing lines we could not classify
    flags: tuple[str, ...] = ()  # the table's flags (dormant...)
    handle: int = 0  # the table's kernel handle (0: not listed)

    def rules_of(self, chain: str) -> list[ObservedRule]:
        return [r for r in self.rules if r.chain == chain]

    @property
    def untagged_rules(self) -> list[ObservedRule]:
        return [r for r in self.rules if r.tag is None]


# --- the listing parser ----------------------------------------------------------
# Input: ``nft -a -s -y list table F T`` (handles, stateless, numeric priorities).

_HANDLE = re.compile(r"^(.*?) # handle (\d+)$")
_COMMENT = re.compile(r' comment "([^"]*)"$')
_KINDS = "|".join(re.escape(k.value) for k in nft.ObjKind)
_OBJ_HEAD = re.compile(rf"^({_KINDS}) (.+) \{{$")
_CHAIN_DEF = re.compile(r"^type (\w+) hook (\w+)(?: device \S+)? priority (-?\d+); policy (\w+);$")
_DEVICES = re.compile(r"devices = \{ (.*) \}")
_TABLE_HEAD = re.compile(r"^table \S+ \S+ \{(?: # handle (\d+))?$")
_TABLE_COMMENT = re.compile(r'comment "([^"]*)"')


def parse_listing(text: str) -> Observed:
    """Parse one table's listing into :class:`Observed`; anything unexpected is
    kept in ``unknown`` so that ownership refuses instead of guessing."""
    marker: str | None = None
    fts: dict[str, ObservedFlowtable] = {}
    chains: dict[str, ObservedChain] = {}
    rules: list[ObservedRule] = []
    counters: dict[str, int] = {}
    objects: list[ObservedObject] = []
    unknown: list[str] = []
    serial: int | None = None
    serial_handle: int | None = None
    flags: tuple[str, ...] = ()
    table_handle = 0

    lines = text.splitlines()
    i = 0
    n = len(lines)
    # skip to the table header
    while i < n and not lines[i].startswith("table "):
        i += 1
    if i < n and (th := _TABLE_HEAD.match(lines[i])) is not None and th.group(1):
        table_handle = int(th.group(1))
    i += 1
    while i < n:
        line = lines[i]
        i += 1
        if not line.strip() or line == "}":
            continue
        if not line.startswith("\t") or line.startswith("\t\t"):
            unknown.append(line.strip())
            continue
        body = line[1:]
        if body.startswith("comment "):
            # Exactly one quoted string, taken as it is (ownership compares it
            # byte for byte); anything else stays unknown and is not our marker.
            cm = _TABLE_COMMENT.fullmatch(body)
            marker = cm.group(1) if cm is not None else body
            if cm is None:
                unknown.append(body)
            continue
        if body.startswith("flags "):
            flags = tuple(sorted(f.strip() for f in body[len("flags ") :].split(",")))
            continue
        hm = _HANDLE.match(body)
        head, handle = (hm.group(1), int(hm.group(2))) if hm else (body, 0)
        om = _OBJ_HEAD.match(head)
        if om is None:
            unknown.append(body)
            continue
        kind, name = nft.ObjKind(om.group(1)), om.group(2).strip('"')
        inner: list[str] = []
        while i < n and lines[i] != "\t}":
            inner.append(lines[i].strip())
            i += 1
        i += 1  # the closing brace
        if kind is nft.ObjKind.CHAIN:
            definition = None
            start = 0
            if inner and inner[0].startswith("type "):
                cm = _CHAIN_DEF.match(inner[0])
                if cm is None:
                    unknown.append(f"chain {name}: {inner[0]}")
                else:
                    definition = (cm.group(1), cm.group(2), int(cm.group(3)), cm.group(4))
                start = 1
            chains[name] = ObservedChain(name, definition, handle)
            for raw in inner[start:]:
                if not raw:
                    continue
                rm = _HANDLE.match(raw)
                rtext, rhandle = (rm.group(1), int(rm.group(2))) if rm else (raw, 0)
                rules.append(ObservedRule(name, rhandle, _canonical_listed(rtext)))
        elif kind is nft.ObjKind.FLOWTABLE:
            prio = 0
            devices: frozenset[str] = frozenset()
            hw = cnt = False
            for raw in inner:
                if raw.startswith("hook ingress priority "):
                    prio = int(raw.rsplit(" ", 1)[1].rstrip(";"))
                elif (dm := _DEVICES.search(raw)) is not None:
                    devices = frozenset(d.strip().strip('"') for d in dm.group(1).split(","))
                elif raw.rstrip(";") == "flags offload":
                    hw = True
                elif raw.rstrip(";") == "counter":
                    cnt = True
            fts[name] = ObservedFlowtable(name, prio, devices, hw, cnt, handle)
        elif kind is nft.ObjKind.COUNTER:
            counters[name] = handle
        elif kind is nft.ObjKind.SET and name == nft.SERIAL_SET:
            serial_handle = handle
            elems = [ln for ln in inner if ln.startswith("elements = ")]
            if (
                len(inner) == 2
                and inner[0] == "type inet_service"
                and len(elems) == 1
                and (em := re.fullmatch(r"elements = \{ (\d+) \}", elems[0]))
            ):
                serial = int(em.group(1))
        else:
            objects.append(ObservedObject(kind, name, handle))
    return Observed(
        marker,
        fts,
        chains,
        tuple(rules),
        counters,
        tuple(objects),
        serial,
        serial_handle,
        tuple(unknown),
        flags,
        table_handle,
    )


def _canonical_listed(text: str) -> str:
    m = _COMMENT.search(text)
    if m is None:
        return nft.sort_set_elements(text)
    return nft.sort_set_elements(text[: m.start()]) + text[m.start() :]


# --- the plan ---------------------------------------------------------------------


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
    drift: tuple[str, ...] = ()  # what differs because someone changed the table by hand
    # Each flowtable's devices as derived from the topology, and why (core.devices.explain).
    devices: tuple[str, ...] = ()

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
    """The operations that turn ``observed`` (None: no table) into ``desired``;
    ``observed`` must be ours (core.ownership decides that first)."""
    if observed is None:
        return _create(desired, [], [f"+ table {desired.ref.spec}"])
    why = _rebuild_reason(observed)
    if why is not None:
        return _rebuild(desired, observed, why)
    return _diff(desired.ref, desired, observed)


def _create(desired: nft.Ruleset, first: list[nft.Op], summary: list[str], serial: int = 1) -> Plan:
    ops = first + nft.create_ops(desired, serial)
    summary += [f"+ counter {c}" for c in desired.counters]
    summary += [
        f"+ flowtable {ft.name} devices {{ {', '.join(ft.devices)} }}" for ft in desired.flowtables
    ]
    for c in desired.chains:
        summary.append(f"+ chain {c.name} ({c.type} {c.hook.value} priority {c.priority})")
        summary += [f"    + {r.text}" for r in desired.rules_of(c.name)]
    changes = tuple(
        FlowtableChange(ft.name, added=ft.devices, created=True) for ft in desired.flowtables
    )
    return Plan(desired.ref, tuple(ops), tuple(summary), changes)


def _rebuild_reason(obs: Observed) -> str | None:
    """Why the table cannot be put right piece by piece (None: it can)."""
    if obs.unknown:
        return f"the listing has lines offloadctl cannot classify ({obs.unknown[0]!r})"
    if obs.serial is None:
        # Without our serial nothing makes a piecewise batch conditional on the
        # table being the one we listed; deleting it by handle is.
        return f"its set {nft.SERIAL_SET} is missing or altered"
    for name in obs.chains:
        if obs.rules_of(name) and not nft.is_objname(name):
            return f"chain {name!r} has a name offloadctl does not put into a command"
    for obj in obs.objects:
        if obj.kind in nft.BY_NAME_ONLY and not nft.is_objname(obj.name):
            return (
                f"{obj.kind.value} {obj.name!r} has a name offloadctl does not put into a command"
            )
    return None


def _rebuild(desired: nft.Ruleset, obs: Observed, why: str) -> Plan:
    first: list[nft.Op] = []
    serial = 1
    if obs.serial is not None:
        serial = nft.next_serial(obs.serial)
        first.append(nft.SwapSerial(obs.serial, nft.next_serial(obs.serial)))
    first.append(nft.DeleteTable(obs.handle))
    summary = [f"! table {desired.ref.spec} rebuilt: {why} (its offloaded flows are torn down)"]
    plan = _create(desired, first, summary, serial)
    return replace(plan, drift=(f"table rebuilt: {why}",))


def _diff(ref: nft.TableRef, desired: nft.Ruleset, obs: Observed) -> Plan:
    summary: list[str] = []
    drift: list[str] = []
    changes: list[FlowtableChange] = []
    declared_chains = {c.name for c in desired.chains}

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

    flushes: list[nft.Op] = []  # every reference goes first
    set_deletes: list[nft.Op] = []  # then sets and maps (elements may jump to chains)
    chain_deletes: list[nft.Op] = []  # then chains
    deletes: list[nft.Op] = []  # then the other objects
    post_ops: list[nft.Op] = []  # create objects, then rules

    for name, ch in obs.chains.items():
        if name in declared_chains:
            continue
        if obs.rules_of(name):
            flushes.append(nft.FlushChain(name))
        chain_deletes.append(nft.DeleteByHandle(nft.ObjKind.CHAIN, ch.handle, name))
        summary.append(f"- chain {name}")
        drift.append(f"chain {name} is not declared (added by hand?)")

    for chain in desired.chains:
        want = desired.rules_of(chain.name)
        have = obs.rules_of(chain.name)
        cur = obs.chains.get(chain.name)
        # Only forward-hook chains can hold "flow add"; rebuilding them drops
        # any reference (old or new) to a flowtable about to be deleted.
        refs_doomed = bool(doomed) and chain.hook is nft.Hook.FORWARD and cur is not None
        same_rules = [r.listed for r in want] == [r.text for r in have]
        if cur is not None and cur.definition == chain.definition and same_rules:
            if refs_doomed:
                flushes.append(nft.FlushChain(chain.name))
                post_ops += [nft.AddRule(r) for r in want]
            continue
        if cur is None:
            post_ops.append(nft.AddChain(chain))
            summary.append(
                f"+ chain {chain.name} ({chain.type} {chain.hook.value} priority {chain.priority})"
            )
        elif cur.definition != chain.definition:
            if have:
                flushes.append(nft.FlushChain(chain.name))
            chain_deletes.append(nft.DeleteChain(chain.name))
            post_ops.append(nft.AddChain(chain))
            summary.append(f"! chain {chain.name} recreated: hook/type/priority/policy changed")
        else:
            flushes.append(nft.FlushChain(chain.name))
            summary.append(f"~ chain {chain.name}: rules replaced")
        summary += _rule_lines(want, have, drift)
        post_ops += [nft.AddRule(r) for r in want]

    for obj in obs.objects:
        sets = (nft.ObjKind.SET, nft.ObjKind.MAP)
        (set_deletes if obj.kind in sets else deletes).append(
            nft.DeleteByHandle(obj.kind, obj.handle, obj.name)
        )
        summary.append(f"- {obj.kind.value} {obj.name}")
        drift.append(f"{obj.kind.value} {obj.name} is not declared (added by hand?)")
    for name in sorted(set(obs.counters) - set(desired.counters)):
        deletes.append(nft.DeleteByHandle(nft.ObjKind.COUNTER, obs.counters[name], name))
        summary.append(f"- counter {name}")
    for name in desired.counters:
        if name not in obs.counters:
            post_ops.insert(0, nft.AddCounter(name))
            summary.append(f"+ counter {name}")

    ft_ops: list[nft.Op] = []
    for name in sorted(doomed):
        ft_ops.append(nft.DeleteByHandle(nft.ObjKind.FLOWTABLE, obs.flowtables[name].handle, name))
    adds: list[nft.Op] = []
    for ft in desired.flowtables:
        cur_ft = obs.flowtables.get(ft.name)
        if cur_ft is None or ft.name in doomed:
            adds.append(nft.AddFlowtable(ft))
            if cur_ft is None:
                changes.append(FlowtableChange(ft.name, added=ft.devices, created=True))
                summary.append(f"+ flowtable {ft.name} devices {{ {', '.join(ft.devices)} }}")
            continue
        added = tuple(sorted(set(ft.devices) - cur_ft.devices))
        removed = tuple(sorted(cur_ft.devices - set(ft.devices)))
        if added:
            adds.append(nft.AddFlowtable(replace(ft, devices=added)))
            summary.append(f"~ flowtable {ft.name}: + devices {{ {', '.join(added)} }}")
        if removed:
            ft_ops.append(nft.DeleteFlowtableDevices(ft.name, removed))
            summary.append(
                f"~ flowtable {ft.name}: - devices {{ {', '.join(removed)} }}"
                " (their offloaded flows are torn down)"
            )
        if added or removed:
            changes.append(FlowtableChange(ft.name, added=added, removed=removed))

    if obs.flags:
        flags = ", ".join(obs.flags)
        flushes.insert(0, nft.ResetTableFlags())
        summary.insert(0, f"~ table {ref.spec}: flags {flags} cleared")
        drift.insert(0, f"table flags {flags} set by hand (dormant: every hook is off)")
    body = flushes + set_deletes + chain_deletes + deletes + ft_ops + adds + post_ops
    if not body:
        return Plan(ref, (), (), (), tuple(drift))
    assert obs.serial is not None  # else _rebuild_reason
    ops = (nft.SwapSerial(obs.serial, nft.next_serial(obs.serial)), *body)
    _check_order(ops)
    return Plan(ref, ops, tuple(summary), tuple(changes), tuple(drift))


def _rule_lines(
    want: tuple[nft.Rule, ...], have: list[ObservedRule], drift: list[str]
) -> list[str]:
    lines: list[str] = []
    want_listed = {r.listed for r in want}
    have_listed = {r.text for r in have}
    want_tags = {r.tag: r for r in want}
    for r in have:
        if r.text in want_listed:
            continue
        if r.tag is None:
            lines.append(f"    - {r.text} (handle {r.handle}, not ours: added by hand)")
            drift.append(f"rule handle {r.handle} in {r.chain} added by hand")
        elif r.tag in want_tags:
            lines.append(f"    ~ {r.text} (changed by hand; restored)")
            drift.append(f"rule {nft.TAG_PREFIX}{r.tag} in {r.chain} changed by hand")
        else:
            lines.append(f"    - {r.text}")
    lines += [f"    + {r.text}" for r in want if r.listed not in have_listed]
    return lines


def _check_order(ops: tuple[nft.Op, ...]) -> None:
    """Guard against our own bugs: a rule must never be added before the
    flowtable it references, nor a flowtable deleted after rules re-reference it."""
    created: set[str] = set()
    for op in ops:
        if isinstance(op, nft.AddFlowtable):
            created.add(op.ft.name)
        if (
            isinstance(op, nft.DeleteByHandle)
            and op.kind is nft.ObjKind.FLOWTABLE
            and op.name in created
        ):
            raise PlanError(f"flowtable {op.name} deleted after being (re)created")

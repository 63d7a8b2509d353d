"""Plan and apply a config: the glue between the pure core and the kernel ports.

``plan`` = render + preflight + ownership + diff; ``apply`` = plan + commit,
all under the namespace's lock:

1. render (pure; bad input stops here and nothing is touched);
2. preflight (core/preflight.py over gathered facts): devices exist, bridge
   ports have names we accept, flowtables are supported, VLAN conflicts;
3. observe the table; core/ownership.py decides whether we may write it;
4. plan against that observation; nothing to do → nothing is sent;
5. create the VLAN devices preflight asked for (undone if step 6 fails);
6. one nft transaction, conditional on the table's serial (compare-and-swap):
   if anyone changed the table since step 3, the kernel refuses it whole;
7. tear down the offloaded flows of devices that left a flowtable (the kernel
   leaves them); a failure here is reported as "committed, follow-up failed".
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from controlplane.config import Config, Vlan
from controlplane.core import nft, ownership, preflight
from controlplane.core.devices import explain
from controlplane.core.plan import Observed, ObservedRule, Plan, make_plan
from controlplane.core.render import Facts, device_sets, render
from controlplane.errors import (
    AfterCommitError,
    ConcurrentChange,
    ControlPlaneError,
    EnvironmentProblem,
    KernelError,
)
from controlplane.loader import line_of

if TYPE_CHECKING:  # Protocols only: importing kernel.ports pulls in the BPF adapters
    from controlplane.kernel.ports import CtPort, LockPort, NftPort, RtnlPort, TeardownResult

UNKNOWN_HANDLE = 0  # the kernel numbers objects from 1: 0 is never a real handle

__all__ = ["ApplyResult", "Ports", "RulesetService", "apply", "flush", "plan", "real_ports"]


@dataclass
class Ports:
    nft: NftPort
    rtnl: RtnlPort
    ct: CtPort
    lock: Callable[[], LockPort]
    facts: Callable[[Config], Facts]
    netns: str | None = None
    # Optional fast path for unchanged re-applies (see VerifiedStamp).
    generation: Callable[[], str | int | None] | None = None
    stamps: StampPort | None = None


class StampPort(Protocol):
    def read(self) -> str | None: ...

    def write(self, value: str) -> None: ...


def _digest(rs: nft.Ruleset) -> str:
    """Everything the desired table is made of (statement texts are canonical per
    builder, so equal digests mean equal tables)."""
    parts = [repr((rs.family, rs.table, rs.flowtables, rs.counters, rs.chains))]
    parts += [f"{r.chain}\0{r.label}\0" + "\0".join([s.text for s in r.stmts]) for r in rs.rules]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def after_device_change(observed: Observed, the_plan: Plan) -> Observed | None:
    """The table as the kernel lists it once ``the_plan`` (computed against
    ``observed``) is committed, if the plan is what a port joining or leaving
    takes: the serial swap, flowtable devices, and (issue 9's per-device classic
    counters) the forward chain's rules replaced and counters added or deleted. None for
    anything else (the next apply lists the table). What the kernel numbers on
    its own is unknown here: new rules and counters get handle 0, and a plan
    that would delete by such a handle is re-planned against a listing."""
    flowtables = dict(observed.flowtables)
    rules = list(observed.rules)
    counters = dict(observed.counters)
    serial = observed.serial
    for op in the_plan.ops:
        if isinstance(op, nft.SwapSerial) and op.old == serial:
            serial = op.new
        elif isinstance(op, nft.AddFlowtable):
            cur = flowtables.get(op.ft.name)
            definition = (op.ft.priority, op.ft.hw_offload, op.ft.counter)
            if cur is None or cur.definition != definition:
                return None  # a created or redefined flowtable gets a new handle
            flowtables[cur.name] = replace(cur, devices=cur.devices | set(op.ft.devices))
        elif isinstance(op, nft.DeleteFlowtableDevices) and op.name in flowtables:
            cur = flowtables[op.name]
            flowtables[cur.name] = replace(cur, devices=cur.devices - set(op.devices))
        elif isinstance(op, nft.FlushChain) and op.name in observed.chains:
            rules = [r for r in rules if r.chain != op.name]
        elif isinstance(op, nft.AddRule) and op.rule.chain in observed.chains:
            rules.append(ObservedRule(op.rule.chain, UNKNOWN_HANDLE, op.rule.listed))
        elif isinstance(op, nft.AddCounter) and op.name not in counters:
            counters[op.name] = UNKNOWN_HANDLE
        elif (
            isinstance(op, nft.DeleteByHandle)
            and op.kind is nft.ObjKind.COUNTER
            and counters.get(op.name) == op.handle
        ):
            del counters[op.name]
        else:
            return None
    return replace(
        observed, flowtables=flowtables, rules=tuple(rules), counters=counters, serial=serial
    )


def _needs_handles(the_plan: Plan) -> bool:
    return any(
        isinstance(op, nft.DeleteByHandle) and op.handle == UNKNOWN_HANDLE for op in the_plan.ops
    )


def _follows(before: str | int, after: str | int) -> bool:
    """True if ``after`` is the generation right after ``before`` (exactly one
    commit in between). Real ids are ``COOKIE:GENID``; the kernel's 32-bit
    counter skips 0 when it wraps."""
    if isinstance(before, int) and isinstance(after, int):
        return after == before + 1
    b_cookie, _, b_gen = str(before).rpartition(":")
    a_cookie, _, a_gen = str(after).rpartition(":")
    if b_cookie != a_cookie or not b_gen.isdigit() or not a_gen.isdigit():
        return False
    nxt = (int(b_gen) + 1) & 0xFFFFFFFF
    return int(a_gen) == (nxt or 1)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Render, plan and commit without the cyclic garbage collector: a 1,000-rule
    apply allocates ~30,000 short-lived, acyclic containers, and the passes they
    trigger (each walking the process's whole young heap, now and then all of
    it) cost ~10% of an apply. Cycles made meanwhile are collected once it is
    back on. Left as it was if someone else (the CLI: see cli.ONE_SHOT) turned
    it off."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@dataclass(frozen=True)
class _Known:
    """The table as it stood at ruleset generation ``generation``."""

    generation: str | int
    ref: nft.TableRef
    observed: Observed


@dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    committed: bool
    checked_only: bool
    vlans_created: tuple[str, ...]
    teardown: TeardownResult | None
    seconds: float
    # Where the time went (seconds per phase): what a join latency breaks down into.
    phases: tuple[tuple[str, float], ...] = ()
    listed: bool = True  # False: planned against the remembered table (generation unchanged)


class RulesetService:
    def __init__(self, ports: Ports) -> None:
        self.p = ports
        # What our last apply left in the kernel, valid while the namespace's
        # ruleset generation stays where our own commit put it: a later apply
        # plans against it instead of listing the table (~23 ms per join under
        # TCG). Any other commit in the namespace bumps the generation and the
        # next apply lists again; the serial CAS still guards the commit itself.
        self._known: _Known | None = None
        # Our last commit, until the generation after it is read (settle()):
        # (generation before, table, what we planned against, the plan).
        self._pending: tuple[str | int, nft.TableRef, Observed, Plan] | None = None

    # -- plan ------------------------------------------------------------------

    def _prepare(
        self, cfg: Config, lap: Callable[[str], None] = lambda _name: None
    ) -> tuple[nft.Ruleset, list[Vlan], Facts]:
        facts = self.p.facts(cfg)
        lap("prepare: facts")
        for bridge, ports in facts.bridge_ports.items():
            problem = preflight.bridge_port_problem(bridge, ports)
            if problem:
                raise EnvironmentProblem(problem)
        rs = render(cfg, facts)
        lap("prepare: render")
        links = self.p.rtnl.links([v.name for v in cfg.vlans])
        ok, why = self.p.nft.flowtables_supported() if rs.flowtables else (True, "")
        # Asked only when a declared VLAN is missing (apply would create it), so
        # plan and apply --check fail where apply would.
        missing = any(v.name not in links for v in cfg.vlans)
        vlan_ok, vlan_why = self.p.rtnl.vlans_supported() if missing else (True, "")
        kfacts = preflight.KernelFacts(links, ok, why, self.p.netns, vlan_ok, vlan_why)
        vlans = preflight.check(cfg, rs, kfacts, lambda loc: line_of(cfg, loc))
        lap("prepare: preflight")
        return rs, vlans, facts

    def _observe(
        self, rs: nft.Ruleset, known: Observed | None = None
    ) -> tuple[Plan, tuple[bool, int | None], Observed | None]:
        observed = known if known is not None else self.p.nft.list_table(rs.ref)
        verdict = ownership.decide(observed)
        ownership.require_writable(rs.ref, verdict)
        seen = (observed is not None, observed.serial if observed is not None else None)
        return make_plan(rs, observed), seen, observed

    def _remembered(self, ref: nft.TableRef, generation: str | int | None) -> Observed | None:
        known = self._known
        if known is None or generation is None:
            return None
        if known.ref != ref or known.generation != generation:
            self._known = None
            return None
        return known.observed

    def plan(self, cfg: Config) -> Plan:
        rs, _, facts = self._prepare(cfg)
        why = tuple(explain(device_sets(cfg, facts))) if cfg.flowtables else ()
        if any(name.endswith("*") for _, name in preflight.interface_matches(cfg)):
            links = self.p.rtnl.links()  # what each wildcard matches now
            why += tuple(preflight.wildcard_notes(cfg, links, lambda loc: line_of(cfg, loc)))
        return replace(self._observe(rs)[0], devices=why)

    # -- apply -----------------------------------------------------------------

    def apply(self, cfg: Config, check: bool = False) -> ApplyResult:
        start = time.perf_counter()
        phases: list[tuple[str, float]] = []

        def lap(name: str) -> None:
            phases.append((name, time.perf_counter() - start - sum(t for _, t in phases)))

        with self.p.lock(), _collector_paused():
            lap("lock")
            rs, vlans, _ = self._prepare(cfg, lap)
            stamp = None
            # Read the generation *before* listing: a change after this read
            # bumps it, so neither the stamp nor the remembered table ever
            # vouches for an unseen change.
            generation = self.p.generation() if not check and self.p.generation else None
            self._settle(generation)
            lap("generation")
            if not vlans and generation is not None and self.p.stamps:
                # Digest only when the stored stamp is of this very generation
                # (a fresh or changed namespace never pays for it); a no-op
                # plan below writes one.
                stored = self.p.stamps.read()
                if stored is not None and stored.startswith(f"{generation} "):
                    stamp = f"{generation} {_digest(rs)}"
                    if stored == stamp:
                        nothing = Plan(rs.ref, (), ())
                        return ApplyResult(nothing, False, False, (), None, self._since(start))
            known = self._remembered(rs.ref, generation)
            self._known = self._pending = None  # whatever happens next, the kernel may change
            the_plan, serial, observed = self._observe(rs, known)
            if known is not None and _needs_handles(the_plan):
                known = None  # e.g. the counter of a port that joined under us
                the_plan, serial, observed = self._observe(rs)
            lap("plan" if known is not None else "list+plan")
            listed = known is None
            if check:
                if not the_plan.empty:
                    self.p.nft.run(the_plan.transaction, check=True)
                return ApplyResult(the_plan, False, True, (), None, time.perf_counter() - start)
            created = tuple(self.p.rtnl.create_vlans(vlans))
            if the_plan.empty:
                if not vlans and generation is not None and self.p.stamps is not None:
                    self.p.stamps.write(stamp or f"{generation} {_digest(rs)}")
                if generation is not None and observed is not None:
                    self._known = _Known(generation, rs.ref, observed)
                return ApplyResult(
                    the_plan, False, False, created, None, self._since(start), tuple(phases), listed
                )
            try:
                self.p.nft.run(the_plan.transaction)
            except BaseException as exc:
                self.p.rtnl.remove_links(list(created))
                if isinstance(exc, KernelError):
                    self._explain_conflict(rs, serial, exc)
                raise
            lap("commit")
            if generation is not None and observed is not None:
                self._pending = (generation, rs.ref, observed, the_plan)
        report = None
        leaving = the_plan.devices_leaving_fast_path()
        if leaving:
            try:
                report = self.p.ct.teardown_flows_via(set(leaving))
            except (ControlPlaneError, OSError) as exc:
                raise AfterCommitError(
                    f"ruleset committed ({len(the_plan.ops)} operations); tearing down the"
                    f" flows of {', '.join(sorted(leaving))} failed: {exc}"
                ) from exc
            lap("teardown")
        return ApplyResult(
            the_plan, True, False, created, report, self._since(start), tuple(phases), listed
        )

    def settle(self) -> None:
        """Finish remembering our last commit: read the generation and derive the
        table it left. Callers with idle time (the agent, after logging a
        commit) call this so the next apply does not; apply() does it otherwise."""
        if self._pending is None or self.p.generation is None:
            return
        try:
            generation = self.p.generation()
        except (ControlPlaneError, OSError):
            generation = None
        self._settle(generation)

    def _settle(self, now: str | int | None) -> None:
        """Remember what our last commit left if ``now`` proves it was the only
        commit since the generation read before its table was observed."""
        pending, self._pending = self._pending, None
        if pending is None or now is None:
            return
        before, ref, observed, the_plan = pending
        if not _follows(before, now):
            return
        derived = after_device_change(observed, the_plan)
        if derived is not None:
            self._known = _Known(now, ref, derived)

    def _explain_conflict(
        self, rs: nft.Ruleset, seen: tuple[bool, int | None], exc: KernelError
    ) -> None:
        """A refused batch whose table appeared, vanished or changed serial
        meanwhile lost a race with another writer: say so."""
        now = self.p.nft.list_table(rs.ref)
        if (now is not None, now.serial if now is not None else None) != seen:
            raise ConcurrentChange(
                "nft transaction",
                f"table {rs.ref.spec} changed since it was listed (another writer);"
                " nothing was committed, run again",
                exc.errno,
                exc.payload,
            ) from exc

    @staticmethod
    def _since(start: float) -> float:
        return time.perf_counter() - start

    # -- flush -----------------------------------------------------------------

    def flush(self, cfg: Config) -> bool:
        """Delete the owned table (and so every flow it offloaded). True if it existed."""
        ref = nft.TableRef(cfg.table.family, cfg.table.name)
        with self.p.lock():
            observed = self.p.nft.list_table(ref)
            verdict = ownership.decide(observed)
            if verdict.ownership is ownership.Ownership.ABSENT:
                return False
            ownership.require_writable(ref, verdict)
            ops: list[nft.Op] = []
            if observed is not None and observed.serial is not None:
                ops.append(nft.SwapSerial(observed.serial, nft.next_serial(observed.serial)))
            ops.append(nft.DeleteTable(observed.handle if observed is not None else 0))
            try:
                self.p.nft.run(nft.Transaction(ref, tuple(ops)))
            except KernelError as exc:
                seen = (True, observed.serial if observed is not None else None)
                self._explain_conflict(nft.Ruleset(ref.family, ref.table), seen, exc)
                raise
        return True


# --- the real adapters ----------------------------------------------------------


class _Conntrack:
    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def teardown_flows_via(self, devices: set[str]) -> TeardownResult:
        from controlplane.kernel.ctnetlink.teardown import teardown_flows_via

        return teardown_flows_via(devices, netns=self.netns)


def real_ports(netns: str | None = None) -> Ports:
    from controlplane.kernel.netns import require_root
    from controlplane.kernel.nft.genid import ruleset_generation
    from controlplane.kernel.nft.libnft import Nft
    from controlplane.kernel.rtnl.facts import gather_facts
    from controlplane.kernel.rtnl.vlans import RtnlLinks
    from controlplane.service.lock import NetnsLock, VerifiedStamp

    require_root("reading or changing the kernel's ruleset")
    return Ports(
        nft=Nft(netns),
        rtnl=RtnlLinks(netns),
        ct=_Conntrack(netns),
        lock=lambda: NetnsLock(netns),
        facts=lambda cfg: gather_facts(cfg, netns),
        netns=netns,
        generation=lambda: ruleset_generation(netns),
        stamps=VerifiedStamp(netns),
    )


def plan(cfg: Config, netns: str | None = None) -> Plan:
    return RulesetService(real_ports(netns)).plan(cfg)


def apply(cfg: Config, netns: str | None = None, check: bool = False) -> ApplyResult:
    return RulesetService(real_ports(netns)).apply(cfg, check=check)


def flush(cfg: Config, netns: str | None = None) -> bool:
    return RulesetService(real_ports(netns)).flush(cfg)

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

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from controlplane.config import Config, Vlan
from controlplane.core import nft, ownership, preflight
from controlplane.core.devices import explain
from controlplane.core.plan import Plan, make_plan
from controlplane.core.render import Facts, device_sets, render
from controlplane.errors import (
    AfterCommitError,
    ConcurrentChange,
    ControlPlaneError,
    EnvironmentProblem,
    KernelError,
)

if TYPE_CHECKING:  # Protocols only: importing kernel.ports pulls in the BPF adapters
    from controlplane.kernel.ports import CtPort, LockPort, NftPort, RtnlPort, TeardownResult

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


@dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    committed: bool
    checked_only: bool
    vlans_created: tuple[str, ...]
    teardown: TeardownResult | None
    seconds: float


class RulesetService:
    def __init__(self, ports: Ports) -> None:
        self.p = ports

    # -- plan ------------------------------------------------------------------

    def _prepare(self, cfg: Config) -> tuple[nft.Ruleset, list[Vlan], Facts]:
        facts = self.p.facts(cfg)
        for bridge, ports in facts.bridge_ports.items():
            problem = preflight.bridge_port_problem(bridge, ports)
            if problem:
                raise EnvironmentProblem(problem)
        rs = render(cfg, facts)
        links = self.p.rtnl.links([v.name for v in cfg.vlans])
        ok, why = self.p.nft.flowtables_supported() if rs.flowtables else (True, "")
        kfacts = preflight.KernelFacts(links, ok, why, self.p.netns)
        vlans = preflight.check(cfg, rs, kfacts)
        return rs, vlans, facts

    def _observe(self, rs: nft.Ruleset) -> tuple[Plan, tuple[bool, int | None]]:
        observed = self.p.nft.list_table(rs.ref)
        verdict = ownership.decide(observed)
        ownership.require_writable(rs.ref, verdict)
        adopt = verdict.ownership is ownership.Ownership.LEGACY
        seen = (observed is not None, observed.serial if observed is not None else None)
        return make_plan(rs, observed, adopt=adopt), seen

    def plan(self, cfg: Config) -> Plan:
        rs, _, facts = self._prepare(cfg)
        why = tuple(explain(device_sets(cfg, facts))) if cfg.flowtables else ()
        return replace(self._observe(rs)[0], devices=why)

    # -- apply -----------------------------------------------------------------

    def apply(self, cfg: Config, check: bool = False) -> ApplyResult:
        start = time.perf_counter()
        with self.p.lock():
            rs, vlans, _ = self._prepare(cfg)
            stamp = None
            if not check and not vlans and self.p.generation and self.p.stamps:
                # Read the generation *before* listing: a change after this
                # read bumps it, so a stamp never vouches for an unseen change.
                generation = self.p.generation()
                stamp = None if generation is None else f"{generation} {_digest(rs)}"
                if stamp is not None and self.p.stamps.read() == stamp:
                    nothing = Plan(rs.ref, (), ())
                    return ApplyResult(nothing, False, False, (), None, self._since(start))
            the_plan, serial = self._observe(rs)
            if check:
                if not the_plan.empty:
                    self.p.nft.run(the_plan.transaction, check=True)
                return ApplyResult(the_plan, False, True, (), None, time.perf_counter() - start)
            created = tuple(self.p.rtnl.create_vlans(vlans))
            if the_plan.empty:
                if stamp is not None and self.p.stamps is not None:
                    self.p.stamps.write(stamp)
                return ApplyResult(the_plan, False, False, created, None, self._since(start))
            try:
                self.p.nft.run(the_plan.transaction)
            except BaseException as exc:
                self.p.rtnl.remove_links(list(created))
                if isinstance(exc, KernelError):
                    self._explain_conflict(rs, serial, exc)
                raise
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
        return ApplyResult(the_plan, True, False, created, report, self._since(start))

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
            ops.append(nft.DeleteTable())
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

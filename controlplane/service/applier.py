"""The agent's apply port: the ruleset (``service.ruleset``) and the reuseport
groups (``service.reuseport``) of one network namespace, in that order.

Two things make the agent's re-plans cheaper than a CLI apply, both decided in
``core/``: the kernel's flowtable support is remembered once it said yes
(``core.support``), and a topology re-plan takes its facts from the watcher's
link cache (``core.linkfacts``) instead of asking the kernel, for that one
apply only. Heavy imports (libnftables, bcc) happen on first use so
``offloadctl agent --help`` and the unit tests stay light.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlplane.config import Config, Vlan
from controlplane.core import nft
from controlplane.core.devices import LinkFacts
from controlplane.core.flowpath import Link
from controlplane.core.linkfacts import facts_from_links, links_by_name_hint
from controlplane.core.plan import Observed
from controlplane.core.preflight import LinkInfo
from controlplane.core.support import SupportMemo
from controlplane.errors import AfterCommitError, EnvironmentProblem
from controlplane.service.reuseport import GroupsPort, OwnedGroups, ReuseportGroups

if TYPE_CHECKING:
    from controlplane.kernel.ports import NftPort, RtnlPort
    from controlplane.service.ruleset import RulesetService

__all__ = ["ApplyOutcome", "KernelApplier"]


@dataclass(frozen=True)
class ApplyOutcome:
    changed: bool
    summary: tuple[str, ...] = ()
    seconds: float = 0.0
    # reuseport group -> facts (prog id, pin dir, capacity) of each declared group
    reuseport: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Milliseconds per apply phase (lock, prepare, list+plan or plan, commit...):
    # logged with a topology commit so a join's latency can be broken down.
    phases: dict[str, float] = field(default_factory=dict)
    flows_torn_down: int = 0  # offloaded flows of devices that left a flowtable
    # Groups no longer declared that are still ours: their removal failed or
    # could not be checked (``problems`` says why). The state keeps them.
    kept_groups: tuple[str, ...] = ()
    kept_bpffs: str = ""  # where the kept groups are pinned (the earlier run's bpffs)
    problems: tuple[str, ...] = ()


class _SupportCached:
    """The nft port with ``flowtables_supported`` remembered once it said yes."""

    def __init__(self, inner: NftPort) -> None:
        self._inner = inner
        self._memo = SupportMemo()

    def list_table(self, ref: nft.TableRef) -> Observed | None:
        return self._inner.list_table(ref)

    def show(self, ref: nft.TableRef) -> str | None:
        return self._inner.show(ref)

    def run(self, txn: nft.Transaction, check: bool = False) -> None:
        self._inner.run(txn, check)

    def flowtables_supported(self) -> tuple[bool, str]:
        return self._memo.ask(self._inner.flowtables_supported)


class _LinkNamesFromHint:
    """The rtnl port, answering the preflight's link names from the watcher's
    cache when a re-plan runs on it (an ``if_nameindex`` dump in the namespace
    otherwise: ~1.4 ms host at 200 links, tens of ms under TCG). VLAN details
    still come from the kernel."""

    def __init__(self, inner: RtnlPort) -> None:
        self._inner = inner
        self.names: frozenset[str] | None = None  # for the next links() call only

    def links(self, vlan_names: Iterable[str] = ()) -> Mapping[str, LinkInfo]:
        names, self.names = self.names, None
        wanted = list(vlan_names)
        hinted = links_by_name_hint(names, wanted)
        return hinted if hinted is not None else self._inner.links(wanted)

    def bridge_ports(self, bridge: str) -> list[str]:
        return self._inner.bridge_ports(bridge)

    def create_vlans(self, vlans: list[Vlan]) -> list[str]:
        return self._inner.create_vlans(vlans)

    def remove_links(self, names: list[str]) -> None:
        self._inner.remove_links(names)

    def vlans_supported(self) -> tuple[bool, str]:
        return self._inner.vlans_supported()


class KernelApplier:
    """The real ``agent.ports.Applier``."""

    def __init__(self, groups: GroupsPort | None = None) -> None:
        self._service: RulesetService | None = None  # one libnftables context per agent
        self._groups_port = groups
        self._groups: ReuseportGroups | None = None
        # The watcher's link cache, used instead of asking the kernel for the
        # next apply only (see plan_next_from).
        self._links_hint: Mapping[int, Link] | None = None

    def plan_next_from(self, links: Mapping[int, Link]) -> None:
        """Take the next apply's facts from ``links`` (the watcher's cache, which
        already holds the event that made us re-plan), not from a netlink dump."""
        self._links_hint = links

    def _ruleset(self, netns: str | None) -> RulesetService:
        if self._service is None:
            from controlplane.kernel.rtnl.facts import gather_facts
            from controlplane.service.ruleset import RulesetService, real_ports

            ports = real_ports(netns)
            ports.nft = _SupportCached(ports.nft)
            rtnl = _LinkNamesFromHint(ports.rtnl)
            ports.rtnl = rtnl

            def facts(cfg: Config) -> LinkFacts:
                hint, self._links_hint = self._links_hint, None
                rtnl.names = None
                if hint is not None:
                    found = facts_from_links(cfg, hint)
                    rtnl.names = frozenset(link.name for link in hint.values())
                    return found
                return gather_facts(cfg, netns)

            ports.facts = facts
            self._service = RulesetService(ports)
        return self._service

    def _reuseport(self, netns: str | None) -> ReuseportGroups:
        if self._groups is None:
            port = self._groups_port
            if port is None:
                from controlplane.kernel.bpf.groups import BpfGroups

                port = BpfGroups(netns)
            self._groups = ReuseportGroups(port)
        return self._groups

    def settle(self) -> None:
        """Idle-time work after a commit (see RulesetService.settle)."""
        if self._service is not None:
            self._service.settle()

    def apply(self, cfg: Config, netns: str | None, owned: OwnedGroups | None) -> ApplyOutcome:
        start = time.perf_counter()
        summary: list[str] = []
        phases: dict[str, float] = {}
        torn = 0
        try:
            res = self._ruleset(netns).apply(cfg)
            phases = {name: round(t * 1000, 1) for name, t in res.phases}
        except AfterCommitError as exc:
            # Committed: the new ruleset is in place, so it is the running one now;
            # the failed follow-up (flow teardown) is reported, not rolled back.
            summary.append(f"committed; follow-up failed: {exc}")
        else:
            summary += list(res.plan.summary) if not res.plan.empty else []
            if res.teardown is not None:
                torn = res.teardown.deleted
                summary.append(f"tore down {torn} flow(s) through removed devices")
        finally:
            self._links_hint = None  # for this apply only, whether or not it got that far
        groups = self._reuseport(netns).reconcile(cfg.reuseport, owned)
        summary += groups.summary
        kept = tuple(g for g in groups.owned if g not in groups.facts)
        return ApplyOutcome(
            changed=bool(summary),
            summary=tuple(summary),
            seconds=time.perf_counter() - start,
            reuseport=groups.facts,
            phases=phases,
            flows_torn_down=torn,
            kept_groups=kept,
            kept_bpffs=owned.reuseport_bpffs if kept and owned else "",
            problems=groups.problems,
        )

    def cleanup(self, cfg: Config, netns: str | None, owned: OwnedGroups | None) -> list[str]:
        """Remove the table and every group we own; EnvironmentProblem naming what
        could not be removed (the rest is done, and the state is then kept)."""
        done: list[str] = []
        if self._ruleset(netns).flush(cfg):
            done.append(f"deleted table {cfg.table.family} {cfg.table.name}")
        removed, problems = self._reuseport(netns).remove_all(cfg.reuseport, owned)
        done += removed
        if problems:
            raise EnvironmentProblem("; ".join([*done, *problems]))
        return done

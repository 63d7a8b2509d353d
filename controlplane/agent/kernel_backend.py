"""The real :class:`~controlplane.agent.ports.Applier` and ``Observer``.

Thin: the apply path (ownership, the per-netns lock, one conditional
transaction, teardown of the flows of devices that left) is
``controlplane.service.ruleset``'s; reuseport pins are the bpf loader's.
Heavy imports (libnftables, bcc) happen on first use so ``offloadctl agent
--help`` and the unit tests stay light.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from controlplane.agent.linkfacts import facts_from_links
from controlplane.agent.ports import ApplyOutcome
from controlplane.agent.snapshot import KernelView
from controlplane.agent.state import AppliedState
from controlplane.config import Config
from controlplane.core.accounting import PathTally
from controlplane.core.flowpath import Link
from controlplane.errors import AfterCommitError, EnvironmentProblem


class _SupportCached:
    """The nft port with ``flowtables_supported`` remembered once it said yes (a
    check transaction per apply, ~8 ms host / ~80 ms TCG; support does not go
    away under a running agent, and a "no" is asked again)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._supported: tuple[bool, str] | None = None

    def flowtables_supported(self) -> tuple[bool, str]:
        if self._supported is not None:
            return self._supported
        answer: tuple[bool, str] = self._inner.flowtables_supported()
        if answer[0]:
            self._supported = answer
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _LinkNamesFromHint:
    """The rtnl port, answering the preflight's link names from the watcher's
    cache when a re-plan runs on it (an ``if_nameindex`` dump in the namespace
    otherwise: ~1.4 ms host at 200 links, tens of ms under TCG). VLAN details
    still come from the kernel."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.names: frozenset[str] | None = None  # for the next links() call only

    def links(self, vlan_names: Any = ()) -> Any:
        from controlplane.core.preflight import LinkInfo

        names, self.names = self.names, None
        wanted = list(vlan_names)
        if names is None or wanted:
            return self._inner.links(wanted)
        return {name: LinkInfo(None) for name in names}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class KernelApplier:
    def __init__(self) -> None:
        self._service: Any = None  # one RulesetService (and libnftables context) per agent
        # Set by the agent before a topology re-plan: the watcher's link cache,
        # used instead of asking the kernel for the next apply only.
        self.links_hint: Mapping[int, Link] | None = None

    def _ruleset(self, netns: str | None) -> Any:
        if self._service is None:
            from controlplane.kernel.rtnl.facts import gather_facts
            from controlplane.service.ruleset import RulesetService, real_ports

            ports = real_ports(netns)
            ports.nft = _SupportCached(ports.nft)
            rtnl = _LinkNamesFromHint(ports.rtnl)
            ports.rtnl = rtnl

            def facts(cfg: Config) -> Any:
                hint, self.links_hint = self.links_hint, None
                rtnl.names = None
                if hint is not None:
                    found = facts_from_links(cfg, hint)
                    rtnl.names = frozenset(link.name for link in hint.values())
                    return found
                return gather_facts(cfg, netns)

            ports.facts = facts
            self._service = RulesetService(ports)
        return self._service

    def settle(self) -> None:
        """Idle-time work after a commit (see RulesetService.settle)."""
        if self._service is not None:
            self._service.settle()

    def apply(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
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
            self.links_hint = None  # for this apply only, whether or not it got that far
        groups = self._reuseport(cfg, netns, owned, summary)
        return ApplyOutcome(
            changed=bool(summary),
            summary=tuple(summary),
            seconds=time.perf_counter() - start,
            reuseport=groups,
            phases=phases,
            flows_torn_down=torn,
        )

    def _reuseport(
        self, cfg: Config, netns: str | None, owned: AppliedState | None, summary: list[str]
    ) -> dict[str, dict[str, Any]]:
        wanted = {g.name for g in cfg.reuseport.groups}
        stale = [g for g in (owned.reuseport_groups if owned else ()) if g not in wanted]
        if not wanted and not stale:
            return {}
        from controlplane.kernel.bpf import loader

        facts: dict[str, dict[str, Any]] = {}
        for group in cfg.reuseport.groups:
            res = loader.load_group(
                group.name,
                netns=netns,
                bpffs=cfg.reuseport.bpffs,
                max_listeners=group.max_listeners,
                drop_when_no_target=group.drop_when_no_target,
            )
            if not res.already_loaded:
                summary.append(f"+ reuseport group {group.name} (prog id {res.prog_id})")
            facts[group.name] = {
                "pin_dir": res.pin_dir,
                "prog_id": res.prog_id,
                "capacity": res.capacity,
            }
        for group_name in stale:
            try:
                loader.unload_group(
                    group_name, netns=netns, bpffs=owned.reuseport_bpffs if owned else "/sys/fs/bpf"
                )
            except EnvironmentProblem:
                continue  # already gone: nothing of ours left to remove
            summary.append(f"- reuseport group {group_name}")
        return facts

    def cleanup(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> list[str]:
        done: list[str] = []
        if self._ruleset(netns).flush(cfg):
            done.append(f"deleted table {cfg.table.family} {cfg.table.name}")
        groups = set(owned.reuseport_groups if owned else ()) | {
            g.name for g in cfg.reuseport.groups
        }
        if groups:
            from controlplane.kernel.bpf import loader

            for name in sorted(groups):
                try:
                    res = loader.unload_group(name, netns=netns, bpffs=cfg.reuseport.bpffs)
                except EnvironmentProblem:
                    continue
                done.append(
                    f"unloaded reuseport group {name} ({res.live_listeners} live listeners)"
                )
        return done


def _reuseport(cfg: Config, netns: str | None) -> dict[str, dict[str, Any]]:
    """Each configured group's generations and program counters (BPF map reads)."""
    groups: dict[str, dict[str, Any]] = {}
    if not cfg.reuseport.groups:
        return groups
    from controlplane.reuseport import ReuseportGroup

    for g in cfg.reuseport.groups:
        try:
            with ReuseportGroup.open(g.name, netns, cfg.reuseport.bpffs) as group:
                st = group.status()
        except EnvironmentProblem as exc:
            groups[g.name] = {"error": str(exc)}
            continue
        groups[g.name] = {
            "prog_id": st.prog_id,
            "target_generation": st.target_generation,
            "generations": [
                {
                    "generation": gen.generation,
                    "active": gen.active,
                    "target": gen.target,
                    "listeners": len(gen.slots),
                }
                for gen in st.generations
            ],
            "counters": asdict(st.counters),
        }
    return groups


class KernelObserver:
    def __init__(self) -> None:
        self._nft: Any = None
        self._capable: tuple[bool, str] | None = None  # remembered once yes (see _SupportCached)
        # Forwarded totals by path; stepped only by observe() (one helper thread).
        self._paths = PathTally()

    def _count_paths(self, cfg: Config, netns: str | None, counters: dict[str, Any]) -> None:
        """Step the fast/classic tally with this view's readings (core/accounting.py)."""
        from controlplane.core.devices import CLASSIC_IN_PREFIX
        from controlplane.core.render import CLASSIC_COUNTER

        entries = None
        if any(ft.counter for ft in cfg.flowtables):  # else conntrack holds no fast-path counts
            from controlplane.kernel.ctnetlink.accounting import entry_counters

            entries = entry_counters(netns)
        classic = counters.get(CLASSIC_COUNTER)
        inputs = [c for n, c in counters.items() if n.startswith(CLASSIC_IN_PREFIX)]
        self._paths.step(
            entries,
            (classic["packets"], classic["bytes"]) if classic else None,
            (sum(c["packets"] for c in inputs), sum(c["bytes"] for c in inputs))
            if inputs
            else None,
        )

    def observe(self, cfg: Config, netns: str | None) -> KernelView:
        from controlplane.kernel import status

        info = status.collect(
            cfg.table.name, netns, family=cfg.table.family, capability=self._capable
        )
        if info["kernel"]["can_offload"]:
            self._capable = (True, info["kernel"]["reason"])
        groups = _reuseport(cfg, netns)
        self._count_paths(cfg, netns, info["counters"])
        now = time.time()
        return KernelView(
            at=now,
            table_at=now,
            table_present=bool(info["table"]),
            flowtables={ft["name"]: tuple(ft["devices"]) for ft in info["flowtables"]},
            counters=dict(info["counters"]),
            conntrack=int(info["conntrack"]),
            offloaded=int(info["offloaded"]),
            kernel=dict(info["kernel"]),
            forwarded_flows=int(info["forwarded_flows"]),
            forwarded_offloaded=int(info["forwarded_offloaded"]),
            hw_offloaded=int(info["hw_offloaded"]),
            reuseport=groups,
            forwarded=self._paths.totals(),
        )

    def observe_table(self, cfg: Config, netns: str | None) -> KernelView:
        """The cheap part (table, flowtable devices, named counters, reuseport
        groups): two nft list calls and BPF map reads, no conntrack dump, so the
        loop thread can afford it on every status request."""
        from controlplane.core import nft
        from controlplane.kernel.flowstate import named_counters
        from controlplane.kernel.nft.libnft import Nft

        if self._nft is None:  # the loop thread's own context (bound to netns)
            self._nft = Nft(netns)
        ref = nft.TableRef(cfg.table.family, cfg.table.name)
        observed = self._nft.list_table(ref)
        now = time.time()
        groups = _reuseport(cfg, netns)
        if observed is None:
            return KernelView(table_at=now, reuseport=groups)
        return KernelView(
            table_at=now,
            reuseport=groups,
            table_present=True,
            flowtables={n: tuple(sorted(f.devices)) for n, f in observed.flowtables.items()},
            counters=named_counters(self._nft.show(ref) or "") if observed.counters else {},
        )

    def flows(
        self, cfg: Config, netns: str | None, limit: int, selector: Any, offloaded: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        """``offloadctl flows``' answer, read from the kernel exactly as the CLI
        reads it without an agent (kernel/flowstate.py). The invalidation index
        is not consulted: it holds every TCP/UDP entry as *possibly* offloaded."""
        from controlplane.kernel.flowstate import read_flow_docs

        return read_flow_docs(netns, cfg.table.name, selector, offloaded, limit)

"""The real :class:`~controlplane.agent.ports.Applier` and ``Observer``.

Thin: the apply path (ownership, the per-netns lock, one conditional
transaction, teardown of the flows of devices that left) is
``controlplane.service.ruleset``'s; reuseport pins are the bpf loader's.
Heavy imports (libnftables, bcc) happen on first use so ``offloadctl agent
--help`` and the unit tests stay light.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from controlplane.agent.ports import ApplyOutcome
from controlplane.agent.snapshot import KernelView
from controlplane.agent.state import AppliedState
from controlplane.config import Config
from controlplane.errors import AfterCommitError, EnvironmentProblem


class KernelApplier:
    def __init__(self) -> None:
        self._service: Any = None  # one RulesetService (and libnftables context) per agent

    def _ruleset(self, netns: str | None) -> Any:
        if self._service is None:
            from controlplane.service.ruleset import RulesetService, real_ports

            self._service = RulesetService(real_ports(netns))
        return self._service

    def apply(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        start = time.perf_counter()
        summary: list[str] = []
        try:
            res = self._ruleset(netns).apply(cfg)
        except AfterCommitError as exc:
            # Committed: the new ruleset is in place, so it is the running one now;
            # the failed follow-up (flow teardown) is reported, not rolled back.
            summary.append(f"committed; follow-up failed: {exc}")
        else:
            summary += list(res.plan.summary) if not res.plan.empty else []
            if res.teardown is not None:
                summary.append(f"tore down {res.teardown.deleted} flow(s) through removed devices")
        groups = self._reuseport(cfg, netns, owned, summary)
        return ApplyOutcome(
            changed=bool(summary),
            summary=tuple(summary),
            seconds=time.perf_counter() - start,
            reuseport=groups,
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


class KernelObserver:
    def observe(self, cfg: Config, netns: str | None) -> KernelView:
        from controlplane.kernel import status

        info = status.collect(cfg.table.name, netns, family=cfg.table.family)
        groups: dict[str, dict[str, Any]] = {}
        if cfg.reuseport.groups:
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
        return KernelView(
            at=time.time(),
            table_present=bool(info["table"]),
            flowtables={ft["name"]: tuple(ft["devices"]) for ft in info["flowtables"]},
            counters=dict(info["counters"]),
            conntrack=int(info["conntrack"]),
            offloaded=int(info["offloaded"]),
            reuseport=groups,
        )

    def flows(self, netns: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        # TODO(integration): answer from H4a's flow index (with each flow's path devices)
        # instead of a dump, once the engine runs in the agent.
        from controlplane.kernel.ctnetlink.conntrack import dump_flows

        flows = dump_flows(netns, only_offloaded=True)
        out = [
            {
                "id": f.id,
                "zone": f.zone,
                "mark": f.mark,
                "orig": asdict(f.orig),
                "reply": asdict(f.reply),
            }
            for f in flows[:limit]
        ]
        return out, len(flows) > limit

"""Plan and apply a config: the glue between the pure core and the kernel adapters.

Order of an apply, and why:
1. parse + render (pure; bad input stops here and nothing is touched);
2. preflight against the kernel: devices exist, bridges resolve, flowtables
   are supported, the table is ours;
3. create declared VLAN devices that are missing (undone if step 4 fails);
4. one nft transaction (check mode: the kernel validates, nothing commits);
5. tear down the offloaded flows of devices that left a flowtable, which the
   kernel itself leaves in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from controlplane.config import FLOWTABLE_MAX_DEVICES, TOO_MANY_DEVICES, Config
from controlplane.core import nft
from controlplane.core.plan import Plan, make_plan, parse_listing
from controlplane.core.render import render
from controlplane.errors import EnvironmentProblem, UnsupportedError
from controlplane.kernel import probe
from controlplane.kernel.ctnetlink.teardown import TeardownReport, teardown_flows_via
from controlplane.kernel.netns import require_root
from controlplane.kernel.nft.libnft import Nft
from controlplane.kernel.rtnl import topology
from controlplane.kernel.rtnl.facts import gather_facts
from controlplane.kernel.rtnl.vlans import ensure_vlans, remove_vlans

__all__ = ["ApplyResult", "apply", "plan"]


@dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    committed: bool
    checked_only: bool
    vlans_created: tuple[str, ...]
    teardown: TeardownReport | None
    seconds: float


def _preflight(cfg: Config, rs: nft.Ruleset, netns: str | None) -> None:
    present = topology.link_names(netns) | {v.name for v in cfg.vlans}
    for i, ft in enumerate(cfg.flowtables):
        for j, dev in enumerate(ft.devices):
            if dev not in present:
                where = f" in network namespace {netns!r}" if netns else ""
                raise EnvironmentProblem(
                    f"flowtables[{i}].devices[{j}]: device {dev!r} does not exist{where}"
                )
    owners: dict[str, str] = {}
    for rendered in rs.flowtables:
        if len(rendered.devices) > FLOWTABLE_MAX_DEVICES:
            raise EnvironmentProblem(
                f"flowtable {rendered.name}: {len(rendered.devices)} devices with bridge ports"
                f" resolved; {TOO_MANY_DEVICES}"
            )
        for dev in rendered.devices:
            if dev in owners:
                raise EnvironmentProblem(
                    f"device {dev!r} would be in flowtables {owners[dev]!r} and {rendered.name!r}"
                    " (a bridge port listed twice?)"
                )
            owners[dev] = rendered.name
    if rs.flowtables:
        cap = probe.flowtables(netns)
        if not cap.ok:
            raise UnsupportedError(f"this kernel cannot offload: {cap.reason}")


def _observe(nftctx: Nft, rs: nft.Ruleset) -> Plan:
    listing = nftctx.list_table(rs.family, rs.table)
    observed = parse_listing(*listing) if listing is not None else None
    if observed is not None and observed.rules and not any(r.tag for r in observed.rules):
        raise EnvironmentProblem(
            f"table {rs.family} {rs.table} exists and was not written by offloadctl"
            " (none of its rules carry our tag); pick another table name or delete it"
        )
    return make_plan(rs, observed)


def plan(cfg: Config, netns: str | None = None) -> Plan:
    require_root("reading the kernel's ruleset")
    rs = render(cfg, gather_facts(cfg, netns))
    return _observe(Nft(netns), rs)


def apply(cfg: Config, netns: str | None = None, check: bool = False) -> ApplyResult:
    require_root("applying a ruleset")
    start = time.perf_counter()
    rs = render(cfg, gather_facts(cfg, netns))
    _preflight(cfg, rs, netns)
    nftctx = Nft(netns)
    the_plan = _observe(nftctx, rs)
    created: list[str] = []
    if not check:
        created = ensure_vlans(cfg.vlans, netns)
    if the_plan.empty:
        return ApplyResult(
            the_plan, False, check, tuple(created), None, time.perf_counter() - start
        )
    try:
        nftctx.run(the_plan.transaction, check=check)
    except BaseException:
        remove_vlans(created, netns)
        raise
    report = None
    leaving = the_plan.devices_leaving_fast_path()
    if leaving and not check:
        report = teardown_flows_via(set(leaving), netns=netns)
    return ApplyResult(
        the_plan, not check, check, tuple(created), report, time.perf_counter() - start
    )


def flush(cfg: Config, netns: str | None = None) -> bool:
    """Delete the owned table (and so every flow it offloaded). True if it existed."""
    require_root("flushing the ruleset")
    nftctx = Nft(netns)
    if nftctx.list_table(cfg.table.family, cfg.table.name) is None:
        return False
    ref = nft.TableRef(cfg.table.family, cfg.table.name)
    nftctx.run(nft.Transaction(ref, (nft.DeleteTable(),)))
    return True

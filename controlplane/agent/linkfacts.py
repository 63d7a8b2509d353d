"""Render facts from the links the watcher already knows (no netlink round trip).

A port joining a bridge arrives as a link event that the invalidation engine
has applied to its link cache before the agent re-plans; the facts a re-plan
needs (each configured bridge's ports, the links by name for VLAN lowers) are
then a pure function of that cache. ``kernel/rtnl/facts.gather_facts`` asks the
kernel instead (a pyroute2 socket and one request per bridge and device,
~11 ms on the host, ~10x that under TCG), which the agent still uses at start,
on reload and on every retry after a refused commit (the kernel is the truth
when the cache may be behind).
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.config import Config
from controlplane.core.flowpath import Link
from controlplane.core.render import Facts
from controlplane.errors import EnvironmentProblem


def facts_from_links(cfg: Config, links: Mapping[int, Link]) -> Facts:
    """What ``gather_facts`` returns, from a link cache (same errors for bridges)."""
    if not cfg.flowtables:
        return Facts()
    by_name = {link.name: link for link in links.values()}
    ports: dict[str, tuple[str, ...]] = {}
    for ft in cfg.flowtables:
        for bridge in ft.bridges:
            found = by_name.get(bridge)
            if found is None or found.kind != "bridge":
                why = "no such device" if found is None else "not a bridge"
                raise EnvironmentProblem(f"flowtable {ft.name}: bridge {bridge}: {why}")
            ports[bridge] = tuple(
                sorted(x.name for x in links.values() if x.master == found.ifindex)
            )
    # Every known link: LinkFacts needs "at least" ports, listed devices and
    # their lower devices; the rest is never looked up.
    return Facts(bridge_ports=ports, links=by_name)

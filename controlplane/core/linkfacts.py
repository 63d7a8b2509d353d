"""Render facts from a link cache, and the one rule both fact sources share.

A port joining a bridge arrives as a link event that the invalidation engine
has applied to its link cache before the agent re-plans; the facts a re-plan
needs (each configured bridge's ports, the links by name for VLAN lowers) are
then a pure function of that cache. ``kernel/rtnl/facts.gather_facts`` asks the
kernel instead; both name a missing or wrong bridge through :func:`bridge_link`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from controlplane.config import Config
from controlplane.core.devices import LinkFacts
from controlplane.core.flowpath import Link
from controlplane.core.preflight import LinkInfo
from controlplane.errors import EnvironmentProblem

__all__ = ["bridge_link", "facts_from_links", "links_by_name_hint"]


def bridge_link(flowtable: str, bridge: str, found: Link | None) -> Link:
    """``found`` (the link named ``bridge``) if it is a bridge; else the one error."""
    if found is None or found.kind != "bridge":
        why = "no such device" if found is None else "not a bridge"
        raise EnvironmentProblem(f"flowtable {flowtable}: bridge {bridge}: {why}")
    return found


def facts_from_links(cfg: Config, links: Mapping[int, Link]) -> LinkFacts:
    """What ``gather_facts`` returns, from a link cache (same errors for bridges)."""
    if not cfg.flowtables:
        return LinkFacts()
    by_name = {link.name: link for link in links.values()}
    ports: dict[str, tuple[str, ...]] = {}
    for ft in cfg.flowtables:
        for bridge in ft.bridges:
            found = bridge_link(ft.name, bridge, by_name.get(bridge))
            ports[bridge] = tuple(
                sorted(x.name for x in links.values() if x.master == found.ifindex)
            )
    # Every known link: LinkFacts needs "at least" ports, listed devices and
    # their lower devices; the rest is never looked up.
    return LinkFacts(bridge_ports=ports, links=by_name)


def links_by_name_hint(
    names: Collection[str] | None, vlan_names: Collection[str]
) -> dict[str, LinkInfo] | None:
    """The preflight's link listing from a cache's names, or None when the kernel
    must be asked: no cache, or VLAN details wanted (the cache has no parents'
    names for them)."""
    if names is None or vlan_names:
        return None
    return {name: LinkInfo(None) for name in names}

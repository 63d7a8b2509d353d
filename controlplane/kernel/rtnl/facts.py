"""Gather the kernel facts rendering depends on: bridge ports and the VLAN stacks
under them and under listed devices (``core/devices.py`` decides what to hook).

Reads only, never writes, and hands a plain :class:`~controlplane.core.render.Facts`
to the pure core. Only the links that matter are decoded (the bridges' ports via
a dump filtered by master, listed devices by name, then lower devices by index),
each through the one rtnetlink decoder (:mod:`.codec`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from controlplane.config import Config
from controlplane.core.devices import unhooked_directions
from controlplane.core.flowpath import Flow, Link, flow_egress_addresses, resolve_paths
from controlplane.core.linkfacts import bridge_link
from controlplane.core.render import Facts
from controlplane.errors import EnvironmentProblem, KernelError
from controlplane.kernel.netlink import NetlinkSocket
from controlplane.kernel.rtnl import topology
from controlplane.kernel.rtnl.topology import get_link, ports_of

__all__ = ["gather_facts", "half_offloaded_flows"]

# Stacked devices followed down (QinQ is two; the kernel stops at five).
_MAX_LOWER = 5


def gather_facts(cfg: Config, netns: str | None) -> Facts:
    if not cfg.flowtables:
        return Facts()
    try:
        return _gather(cfg, netns)
    except KernelError as exc:
        where = f" in network namespace {netns!r}" if netns else ""
        raise EnvironmentProblem(f"reading links{where}: {exc.message}") from None


def _gather(cfg: Config, netns: str | None) -> Facts:
    ports: dict[str, tuple[str, ...]] = {}
    links: dict[int, Link] = {}
    with NetlinkSocket(socket.NETLINK_ROUTE, netns, operation="read links") as nl:
        for ft in cfg.flowtables:
            for bridge in ft.bridges:
                if bridge in ports:
                    continue
                found = bridge_link(ft.name, bridge, get_link(nl, name=bridge))
                members = ports_of(nl, found.ifindex)
                ports[bridge] = tuple(sorted(m.name for m in members))
                links[found.ifindex] = found
                links.update((m.ifindex, m) for m in members)
            known = {link.name for link in links.values()}
            for dev in ft.devices:
                if dev not in known and (link := get_link(nl, name=dev)) is not None:
                    links[link.ifindex] = link
        # Masters of listed devices (a VLAN port's bridge, named in the note).
        masters = {x.master for x in links.values() if x.master is not None} - set(links)
        links.update((m.ifindex, m) for i in sorted(masters) if (m := get_link(nl, index=i)))
        # VLAN devices' lower devices, down to the real one. A lower device in
        # another namespace is not found here: derivation reports it.
        todo = [link for link in links.values() if link.kind == "vlan"]
        for _ in range(_MAX_LOWER):
            lowers = {x.lower for x in todo if x.lower is not None and x.lower not in links}
            found_links = [f for i in sorted(lowers) if (f := get_link(nl, index=i)) is not None]
            links.update((f.ifindex, f) for f in found_links)
            todo = [f for f in found_links if f.kind == "vlan"]
            if not todo:
                break
    return Facts(bridge_ports=ports, links={link.name: link for link in links.values()})


def half_offloaded_flows(
    flows: Iterable[Flow], suspect_inputs: Iterable[str], netns: str | None
) -> list[Flow]:
    """Offloaded flows with a direction entering through a suspect input (status).

    Resolves each flow's path in a topology snapshot (only when some input is
    suspect: the healthy case costs nothing) and asks the core which flows
    have a direction the flowtable does not hook.
    """
    offloaded = [f for f in flows if f.offloaded]
    suspects = list(suspect_inputs)
    if not offloaded or not suspects:
        return []
    addresses = {a for f in offloaded for a in flow_egress_addresses(f)}
    topo = topology.snapshot(addresses, netns)
    named = {
        flow: (
            tuple(topo.name(i) for i in path.orig.devices),
            tuple(topo.name(i) for i in path.reply.devices),
        )
        for flow, path in resolve_paths(topo, offloaded).items()
    }
    bad = unhooked_directions(named, suspects)
    return [f for f in offloaded if f in bad]

"""Gather the kernel facts rendering depends on (bridge ports today).

The only adapter render needs: it reads, never writes, and hands a plain
:class:`~controlplane.core.render.Facts` to the pure core.
"""

from __future__ import annotations

from controlplane.config import Config
from controlplane.core.render import Facts
from controlplane.errors import EnvironmentProblem, KernelError
from controlplane.kernel.rtnl import topology

__all__ = ["gather_facts"]


def gather_facts(cfg: Config, netns: str | None) -> Facts:
    ports: dict[str, tuple[str, ...]] = {}
    for ft in cfg.flowtables:
        for bridge in ft.bridges:
            if bridge not in ports:
                try:
                    ports[bridge] = tuple(topology.bridge_ports(bridge, netns))
                except KernelError as exc:
                    raise EnvironmentProblem(
                        f"flowtable {ft.name}: bridge {bridge}: {exc.message}"
                    ) from None
    return Facts(bridge_ports=ports)

"""Links for the ruleset service (implements ``RtnlPort``): read them, create the
VLAN devices core/preflight decided on, undo that on failure.

Decisions (which VLANs to create, in which order, what counts as a conflict)
live in ``core/preflight.py``; this module only translates.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from typing import Any

from controlplane.config import Vlan
from controlplane.core.preflight import VLAN_PROTOCOLS, LinkInfo
from controlplane.errors import KernelError, UnsupportedError
from controlplane.kernel.netns import entered
from controlplane.kernel.rtnl import topology

__all__ = ["RtnlLinks", "remove_vlans"]


class RtnlLinks:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _ipr(self) -> Any:
        # Imported here: pyroute2 costs ~170 ms to import; an apply without
        # VLANs (the common case) only lists link names, via the lean codec.
        from pyroute2 import IPRoute

        with entered(self.netns):
            return IPRoute()

    def links(self, vlan_names: Iterable[str] = ()) -> Mapping[str, LinkInfo]:
        out: dict[str, LinkInfo] = {
            name: LinkInfo(None) for name in topology.link_names(self.netns)
        }
        wanted = [n for n in vlan_names if n in out]
        if not wanted:
            return out
        ipr = self._ipr()
        try:
            names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}
            for name in wanted:
                idx = ipr.link_lookup(ifname=name)
                if not idx:
                    continue
                msg = ipr.get_links(idx[0])[0]
                data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
                out[name] = LinkInfo(
                    msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                    data.get("IFLA_VLAN_ID") if data else None,
                    data.get("IFLA_VLAN_PROTOCOL") if data else None,
                    names.get(msg.get("IFLA_LINK")),
                )
        finally:
            ipr.close()
        return out

    def bridge_ports(self, bridge: str) -> list[str]:
        return topology.bridge_ports(bridge, self.netns)

    def create_vlans(self, vlans: list[Vlan]) -> list[str]:
        """Create ``vlans`` in the given order (parents first), up; all or nothing."""
        created: list[str] = []
        if not vlans:
            return created
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._ipr()
        try:
            for vlan in vlans:
                parent = ipr.link_lookup(ifname=vlan.parent)
                try:
                    ipr.link(
                        "add",
                        ifname=vlan.name,
                        kind="vlan",
                        link=parent[0],
                        vlan_id=vlan.id,
                        vlan_protocol=VLAN_PROTOCOLS[vlan.protocol],
                    )
                except NetlinkError as exc:
                    if exc.code == errno.EOPNOTSUPP:
                        raise UnsupportedError(
                            f"vlan {vlan.name}: this kernel has no VLAN support (8021q)"
                        ) from None
                    raise KernelError(f"create vlan {vlan.name}", str(exc), exc.code) from None
                created.append(vlan.name)
                ipr.link("set", index=ipr.link_lookup(ifname=vlan.name)[0], state="up")
        except BaseException:
            _delete(ipr, created)
            raise
        finally:
            ipr.close()
        return created

    def remove_links(self, names: list[str]) -> None:
        remove_vlans(names, self.netns)

    def vlans_supported(self) -> tuple[bool, str]:
        # The module support is the kernel's, not the namespace's: probed in a
        # scratch namespace (kernel/probe.py), nothing left behind.
        from controlplane.kernel.probe import vlan

        cap = vlan()
        return cap.ok, cap.reason


def _delete(ipr: Any, names: list[str]) -> None:
    for name in reversed(names):
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


def remove_vlans(names: list[str], netns: str | None = None) -> None:
    if not names:
        return
    from pyroute2 import IPRoute

    with entered(netns):
        ipr: Any = IPRoute()
    try:
        _delete(ipr, names)
    finally:
        ipr.close()

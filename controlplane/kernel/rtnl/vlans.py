"""Make the VLAN sub-interfaces a config declares exist, and undo that on failure.

Declared VLANs are created when missing and checked when present: an existing
device with the same name but another id, protocol or parent is a conflict we
report rather than "fix" (it may carry someone's traffic).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from controlplane.config import Vlan, VlanProto
from controlplane.errors import EnvironmentProblem, KernelError, UnsupportedError
from controlplane.kernel.netns import entered

_PROTO: dict[VlanProto, int] = {"802.1q": 0x8100, "802.1ad": 0x88A8}


def _order(vlans: Iterable[Vlan]) -> list[Vlan]:
    """Parents before children (QinQ: the outer tag's device first)."""
    pending = list(vlans)
    names = {v.name for v in pending}
    done: set[str] = set()
    out: list[Vlan] = []
    while pending:
        for v in list(pending):
            if v.parent not in names or v.parent in done:
                out.append(v)
                done.add(v.name)
                pending.remove(v)
    return out


def ensure_vlans(vlans: Iterable[Vlan], netns: str | None = None) -> list[str]:
    """Create missing VLAN devices (up); return the names created, for rollback."""
    created: list[str] = []
    todo = _order(vlans)
    if not todo:
        return created
    with entered(netns):
        ipr: Any = IPRoute()
    try:
        for vlan in todo:
            existing = ipr.link_lookup(ifname=vlan.name)
            parent = ipr.link_lookup(ifname=vlan.parent)
            if not parent:
                raise EnvironmentProblem(
                    f"vlan {vlan.name}: parent device {vlan.parent!r} does not exist"
                )
            if existing:
                _check_existing(ipr, vlan, existing[0], parent[0])
                continue
            try:
                ipr.link(
                    "add",
                    ifname=vlan.name,
                    kind="vlan",
                    link=parent[0],
                    vlan_id=vlan.id,
                    vlan_protocol=_PROTO[vlan.protocol],
                )
            except NetlinkError as exc:
                if exc.code == errno.EOPNOTSUPP:
                    raise UnsupportedError(
                        f"vlan {vlan.name}: this kernel has no VLAN support (8021q)"
                    ) from None
                raise KernelError(f"create vlan {vlan.name}", str(exc), exc.code) from None
            created.append(vlan.name)
            idx = ipr.link_lookup(ifname=vlan.name)[0]
            ipr.link("set", index=idx, state="up")
    except BaseException:
        _delete(ipr, created)
        raise
    finally:
        ipr.close()
    return created


def _check_existing(ipr: Any, vlan: Vlan, index: int, parent_index: int) -> None:
    msg = ipr.get_links(index)[0]
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    have = (
        kind,
        data.get("IFLA_VLAN_ID") if data else None,
        (data.get("IFLA_VLAN_PROTOCOL") or 0x8100) if data else None,
        msg.get("IFLA_LINK"),
    )
    want = ("vlan", vlan.id, _PROTO[vlan.protocol], parent_index)
    if have != want:
        raise EnvironmentProblem(
            f"vlan {vlan.name}: a device of that name exists but is not"
            f" {vlan.protocol} id {vlan.id} on {vlan.parent}; remove or rename it"
        )


def _delete(ipr: Any, names: list[str]) -> None:
    for name in reversed(names):
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


def remove_vlans(names: list[str], netns: str | None = None) -> None:
    if not names:
        return
    with entered(netns):
        ipr: Any = IPRoute()
    try:
        _delete(ipr, names)
    finally:
        ipr.close()

"""``offloadctl status``: what the kernel has right now, in one dictionary."""

from __future__ import annotations

from typing import Any

from controlplane.core.plan import parse_listing
from controlplane.kernel.ctnetlink.conntrack import dump_flows
from controlplane.kernel.netns import require_root
from controlplane.kernel.nft.libnft import Nft


def collect(table: str, netns: str | None = None, family: str = "inet") -> dict[str, Any]:
    require_root("reading kernel state")
    listing = Nft(netns).list_table(family, table)
    flows = dump_flows(netns)
    info: dict[str, Any] = {
        "table": listing is not None,
        "flowtables": [],
        "counters": {},
        "conntrack": len(flows),
        "offloaded": sum(1 for f in flows if f.offloaded),
    }
    if listing is None:
        return info
    observed = parse_listing(*listing)
    info["flowtables"] = [
        {
            "name": ft.name,
            "priority": ft.priority,
            "devices": sorted(ft.devices),
            "hw_offload": ft.hw_offload,
            "counter": ft.counter,
        }
        for ft in observed.flowtables.values()
    ]
    for item in listing[0].get("nftables", []):
        if "counter" in item:
            c = item["counter"]
            info["counters"][c["name"]] = {"packets": c["packets"], "bytes": c["bytes"]}
    return info

"""What happened in the kernel: was a flow offloaded, which packets took the classic path.

* ``conntrack_entry`` / ``wait_offloaded``: the connection's conntrack entry read over
  ctnetlink exactly as ``offloadctl flows`` reads it; offloaded = the kernel's
  ``IPS_OFFLOAD`` status bit.
* ``ClassicPath``: ``[OFFLOAD]`` is per flow, not per direction (a direction entering
  through an unhooked device stays on the classic path while conntrack says offloaded), so
  the per-direction truth is a forward-hook counter per input device: offloaded packets skip
  the forward hook of every table, so a separate table of ours counts exactly the classic
  path whatever the config under test does.
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.testing.shell import sh

if TYPE_CHECKING:
    from controlplane.config import Config
    from controlplane.core.flowpath import Flow
    from controlplane.service.ruleset import ApplyResult


class Connection(Protocol):
    proto: Any  # "tcp" | "udp"
    client: tuple[str, int]
    target: tuple[str, int]


def _same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def conntrack_entry(netns: str, conn: Connection) -> Flow | None:
    """The conntrack entry whose original tuple is CONN's (client -> target), or None."""
    from controlplane.kernel.ctnetlink.conntrack import dump_flows

    proto = {"tcp": 6, "udp": 17}[conn.proto]
    for flow in dump_flows(netns):
        o = flow.orig
        if (
            o.proto == proto
            and (o.sport, o.dport) == (conn.client[1], conn.target[1])
            and _same(o.src, conn.client[0])
            and _same(o.dst, conn.target[0])
        ):
            return flow
    return None


def wait_offloaded(netns: str, conn: Connection, timeout: float = 10.0) -> Flow:
    """CONN's conntrack entry once the kernel marked it ``[OFFLOAD]``; AssertionError saying
    what the entry looked like (or that there was none) after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        flow = conntrack_entry(netns, conn)
        if flow is not None and flow.offloaded:
            return flow
        if time.monotonic() > deadline:
            state = "no conntrack entry" if flow is None else f"status {flow.status:#x}"
            raise AssertionError(f"{conn!r} not offloaded in {netns} after {timeout}s: {state}")
        time.sleep(0.05)


def apply_config(netns: str, config: Config | dict[str, Any] | str | Path) -> ApplyResult:
    """Apply a config in NETNS through the public API (``offloadctl apply``'s path): a
    ``Config``, a mapping, YAML text, or a ``Path`` to a YAML/JSON file. A bad config raises
    ``ConfigError`` naming the field, as the CLI prints it."""
    from controlplane.config import Config
    from controlplane.loader import load_config, load_text, parse_config
    from controlplane.service.ruleset import apply

    if isinstance(config, Path):
        cfg = load_config(config)
    elif isinstance(config, str):
        cfg = load_text(config, "<test config>")
    elif isinstance(config, dict):
        cfg = parse_config(config, source="<test config>")
    else:
        cfg = config
    assert isinstance(cfg, Config)
    return apply(cfg, netns)


# --------------------------------------------------------------------------- classic path

OBSERVER_TABLE = "otst_observer"


@dataclass(frozen=True)
class Count:
    packets: int
    bytes: int


def links(netns: str) -> list[str]:
    """Names of NETNS's devices (loopback excluded)."""
    data = json.loads(sh("ip", "-j", "link", "show", netns=netns) or "[]")
    return [str(d["ifname"]) for d in data if d["ifname"] != "lo"]


class ClassicPath:
    """Counts, per input device, the TCP/UDP packets NETNS forwards on the classic path
    (from creation on). Installed as its own ``inet`` table at forward priority -300."""

    def __init__(self, netns: str, devices: list[str] | None = None) -> None:
        self.netns = netns
        self.devices = devices if devices is not None else links(netns)
        self._names = {dev: f"in_{i}" for i, dev in enumerate(self.devices)}
        counters = "".join(f"    counter {c} {{ }}\n" for c in self._names.values())
        rules = "".join(
            f'        iifname "{dev}" meta l4proto {{ tcp, udp }} counter name "{c}"\n'
            for dev, c in self._names.items()
        )
        sh("nft", "-f", "-", netns=netns, input=(
            f"table inet {OBSERVER_TABLE} {{\n{counters}"
            "    chain forward {\n"
            "        type filter hook forward priority -300; policy accept;\n"
            f"{rules}    }}\n}}\n"
        ))  # fmt: skip

    def read(self) -> dict[str, Count]:
        """Packets and bytes per input device since this object was made."""
        out = json.loads(
            sh("nft", "-j", "list", "counters", "table", "inet", OBSERVER_TABLE, netns=self.netns)
        )["nftables"]
        by_name = {
            c["counter"]["name"]: Count(c["counter"]["packets"], c["counter"]["bytes"])
            for c in out
            if "counter" in c
        }
        return {dev: by_name[c] for dev, c in self._names.items()}

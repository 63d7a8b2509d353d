"""Which flows a manual teardown selects: by MAC, IP, prefix or device.

Pure; the same question the invalidation engine answers per event, asked
once over a dump (``offloadctl flows teardown``). A flow is selected when
either direction's cached egress (``flowpath.egress``) depends on the value:

- ``mac``: the next hop's MAC one direction transmits to;
- ``ip``: an endpoint the flow is routed toward, or a next hop (gateway) it uses;
- ``prefix``: an endpoint the flow is routed toward lies inside it;
- ``dev``: a device on either direction's path (ifindex).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from controlplane.core.events import canonical_ip, canonical_mac, canonical_prefix
from controlplane.core.flowpath import (
    Egress,
    Flow,
    Topology,
    egress,
    flow_egress_addresses,
)

__all__ = ["Selector", "select_flows"]

Kind = Literal["mac", "ip", "prefix", "dev"]


@dataclass(frozen=True, slots=True)
class Selector:
    """What to tear down; built through :meth:`parse`, which normalises or raises
    ``ValueError`` naming the flag (``--mac``, ``--ip``, ``--prefix``, ``--dev``)."""

    kind: Kind
    value: str

    @classmethod
    def parse(cls, kind: Kind, value: str) -> Selector:
        field = f"--{kind}"
        if "%" in value and kind in ("ip", "prefix"):
            # Python accepts scoped addresses; a flow's addresses never carry one.
            raise ValueError(f"{field}: {value!r} has a zone (%...), which flows never carry")
        if kind == "mac":
            return cls(kind, canonical_mac(value, field))
        if kind == "ip":
            return cls(kind, canonical_ip(value, field))
        if kind == "prefix":
            canonical = canonical_prefix(value, field)
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError:
                # As ``ip route`` does: 10.0.0.1/8 is more likely a typo than "all of 10/8".
                raise ValueError(
                    f"{field}: {value!r} has host bits set (did you mean {canonical}?)"
                ) from None
            return cls(kind, canonical)
        if not value or len(value) > 15 or "/" in value or value.strip() != value:
            raise ValueError(f"{field}: {value!r} is not a device name")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind} {self.value}"


def _matches(selector: Selector, address: str, out: Egress, ifindex: int | None) -> bool:
    kind = selector.kind
    if kind == "mac":
        return out.mac == selector.value
    if kind == "ip":
        return address == selector.value or (
            out.neighbour is not None and out.neighbour[1] == selector.value
        )
    if kind == "prefix":
        network = ipaddress.ip_network(selector.value)
        addr = ipaddress.ip_address(address)
        return addr.version == network.version and addr in network
    return ifindex is not None and ifindex in out.devices


def select_flows(
    flows: Iterable[Flow], topology: Topology, selector: Selector | None
) -> list[tuple[Flow, tuple[Egress, Egress]]]:
    """The flows (input order) ``selector`` picks, each with its (orig, reply) egress;
    ``None`` picks every forwarded flow. ``offloadctl flows`` lists, and ``flows
    teardown`` tears down the offloaded ones of, exactly this selection.

    Flows to or from the router itself are never selected: they are not
    forwarded, so nothing of theirs is cached on a fast path. For ``dev``, a
    name absent from ``topology`` selects nothing (the caller reports it).
    """
    ifindex = (
        topology.ifindex(selector.value)
        if selector is not None and selector.kind == "dev"
        else None
    )
    egress_to = functools.cache(functools.partial(egress, topology))  # flows share endpoints
    picked: list[tuple[Flow, tuple[Egress, Egress]]] = []
    for flow in flows:
        orig_addr, reply_addr = flow_egress_addresses(flow)
        orig, reply = egress_to(orig_addr), egress_to(reply_addr)
        if orig.local or reply.local:
            continue
        if (
            selector is None
            or _matches(selector, orig_addr, orig, ifindex)
            or _matches(selector, reply_addr, reply, ifindex)
        ):
            picked.append((flow, (orig, reply)))
    return picked

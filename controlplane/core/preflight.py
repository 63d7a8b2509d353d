"""What must hold before a ruleset may be committed, decided over gathered facts. Pure.

``plan`` and ``apply`` run the same preflight (so ``plan`` exits 3 or 4 where
``apply`` would), the adapters only gather :class:`KernelFacts`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.config import FLOWTABLE_MAX_DEVICES, TOO_MANY_DEVICES, Config, Vlan
from controlplane.core import nft
from controlplane.errors import EnvironmentProblem, UnsupportedError

__all__ = ["KernelFacts", "LinkInfo", "check", "vlans_to_create"]

VLAN_PROTOCOLS = {"802.1q": 0x8100, "802.1ad": 0x88A8}


@dataclass(frozen=True)
class LinkInfo:
    """An existing link, as far as the VLAN decisions need it."""

    kind: str | None
    vlan_id: int | None = None
    vlan_protocol: int | None = None
    parent: str | None = None


@dataclass(frozen=True)
class KernelFacts:
    links: Mapping[str, LinkInfo] = field(default_factory=dict)
    flowtables_supported: bool = True
    flowtables_reason: str = ""
    netns: str | None = None


def check(cfg: Config, rs: nft.Ruleset, facts: KernelFacts) -> list[Vlan]:
    """Raise the first reason the ruleset cannot be applied; return the VLAN
    devices to create (parents first)."""
    where = f" in network namespace {facts.netns!r}" if facts.netns else ""
    present = set(facts.links) | {v.name for v in cfg.vlans}
    for i, ft in enumerate(cfg.flowtables):
        for j, dev in enumerate(ft.devices):
            if dev not in present:
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
    create = vlans_to_create(cfg.vlans, facts.links)
    if rs.flowtables and not facts.flowtables_supported:
        raise UnsupportedError(f"this kernel cannot offload: {facts.flowtables_reason}")
    return create


def bridge_port_problem(bridge: str, ports: Iterable[str]) -> str | None:
    """A kernel-reported port name that the config's IfName parser would refuse
    never reaches an nft command: say which."""
    for port in ports:
        if not nft.is_ifname(port):
            return (
                f"bridge {bridge}: port {port!r} has a name offloadctl does not accept"
                " (1-15 of A-Z a-z 0-9 _ . -); rename it or list devices explicitly"
            )
    return None


def vlans_to_create(vlans: Iterable[Vlan], links: Mapping[str, LinkInfo]) -> list[Vlan]:
    """Declared VLANs that are missing, parents before children (QinQ).

    An existing device of a declared name must be exactly that VLAN: anything
    else may carry someone's traffic, so it is a conflict we report, not fix.
    """
    declared = list(vlans)
    names = {v.name for v in declared}
    for v in declared:
        have = links.get(v.name)
        if have is not None:
            parent_ok = have.parent == v.parent
            want = ("vlan", v.id, VLAN_PROTOCOLS[v.protocol])
            if (have.kind, have.vlan_id, have.vlan_protocol or 0x8100) != want or not parent_ok:
                raise EnvironmentProblem(
                    f"vlan {v.name}: a device of that name exists but is not"
                    f" {v.protocol} id {v.id} on {v.parent}; remove or rename it"
                )
        elif v.parent not in links and v.parent not in names:
            raise EnvironmentProblem(f"vlan {v.name}: parent device {v.parent!r} does not exist")
    missing = [v for v in declared if v.name not in links]
    ordered: list[Vlan] = []
    done = set(links)
    while missing:
        ready = [v for v in missing if v.parent in done]
        if not ready:  # a cycle: the config parser rejects these, so our bug
            raise EnvironmentProblem(
                "vlans: parents form a cycle: " + ", ".join(v.name for v in missing)
            )
        for v in ready:
            ordered.append(v)
            done.add(v.name)
            missing.remove(v)
    return ordered

"""What must hold before a ruleset may be committed, decided over gathered facts. Pure.

``plan`` and ``apply`` run the same preflight (so ``plan`` exits 3 or 4 where
``apply`` would), the adapters only gather :class:`KernelFacts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.config import (
    FLOWTABLE_MAX_DEVICES,
    TOO_MANY_DEVICES,
    Config,
    Loc,
    Vlan,
    format_loc,
)
from controlplane.core import nft
from controlplane.errors import EnvironmentProblem, UnsupportedError

__all__ = [
    "KernelFacts",
    "LinkInfo",
    "agent_owner_problem",
    "check",
    "interface_matches",
    "vlans_to_create",
    "wildcard_notes",
]

# Where a config field was written (loader.line_of); None when unknown.
Where = Callable[[Loc], "int | None"]
SHOWN_DEVICES = 12  # devices listed in an "unknown interface" message

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
    # Whether VLAN devices can be created; asked only when some are missing.
    vlans_supported: bool = True
    vlans_reason: str = ""


def interface_matches(cfg: Config) -> Iterator[tuple[Loc, str]]:
    """Every interface name a rule matches (NAT, port forwards, forward accepts,
    offload policies), with the field it was written in."""
    for i, m in enumerate(cfg.nat.masquerade):
        yield ("nat", "masquerade", i, "oifname"), m.oifname
    for i, s in enumerate(cfg.nat.snat):
        yield ("nat", "snat", i, "oifname"), s.oifname
    for i, d in enumerate(cfg.nat.dnat):
        if d.iifname is not None:
            yield ("nat", "dnat", i, "iifname"), d.iifname
    for section, rules in (("forward", cfg.forward.accept), ("policies", cfg.policies)):
        loc: Loc = ("forward", "accept") if section == "forward" else ("policies",)
        for i, rule in enumerate(rules):
            for key in ("iifnames", "oifnames"):
                for j, name in enumerate(getattr(rule, key)):
                    yield (*loc, i, key, j), name


def _wildcard(name: str) -> str | None:
    return name[:-1] if name.endswith("*") else None


def _field(loc: Loc, where: Where) -> str:
    line = where(loc)
    return format_loc(loc) + (f" (line {line})" if line is not None else "")


def _listed(names: Iterable[str]) -> str:
    shown = sorted(names)
    more = f" and {len(shown) - SHOWN_DEVICES} more" if len(shown) > SHOWN_DEVICES else ""
    return ", ".join(shown[:SHOWN_DEVICES]) + more if shown else "none"


def check(
    cfg: Config, rs: nft.Ruleset, facts: KernelFacts, where: Where = lambda _loc: None
) -> list[Vlan]:
    """Raise the first reason the ruleset cannot be applied; return the VLAN
    devices to create (parents first). ``where`` names a field's line."""
    in_ns = f" in network namespace {facts.netns!r}" if facts.netns else ""
    present = set(facts.links) | {v.name for v in cfg.vlans}
    for i, ft in enumerate(cfg.flowtables):
        for j, dev in enumerate(ft.devices):
            if dev not in present:
                raise EnvironmentProblem(
                    f"{_field(('flowtables', i, 'devices', j), where)}: device {dev!r}"
                    f" does not exist{in_ns}"
                )
    # A rule on a name no device has matches nothing, silently (a typo in a
    # masquerade's oifname leaves every new connection unanswered): refuse it.
    # A wildcard ("wan*") may match devices that come later: allowed.
    for loc, name in interface_matches(cfg):
        if name not in present and _wildcard(name) is None:
            raise EnvironmentProblem(
                f"{_field(loc, where)}: interface {name!r} does not exist{in_ns}"
                f" (devices: {_listed(present - {'lo'})}; a trailing * matches by prefix)"
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
    if create and not facts.vlans_supported:
        index = {v.name: i for i, v in enumerate(cfg.vlans)}
        first = create[0]
        raise UnsupportedError(
            f"{_field(('vlans', index[first.name]), where)}: cannot create vlan {first.name}:"
            f" {facts.vlans_reason or 'this kernel has no VLAN support (8021q)'}"
        )
    return create


def wildcard_notes(
    cfg: Config, links: Iterable[str], where: Where = lambda _loc: None
) -> list[str]:
    """What each wildcard name matches now (``plan`` prints these)."""
    names = sorted(links)
    notes = []
    for loc, name in interface_matches(cfg):
        prefix = _wildcard(name)
        if prefix is not None:
            now = [n for n in names if n.startswith(prefix)]
            notes.append(
                f"{_field(loc, where)}: {name!r} is a wildcard; matches {_listed(now)} now"
            )
    return notes


def agent_owner_problem(
    table: str, agent: Mapping[str, Any] | None, netns: str | None, force: bool
) -> str | None:
    """Why a one-shot write (apply, flush) of ``table`` must not run while an
    agent manages it, or None. ``agent``: the agent's own status answer (None:
    no agent answered). Two writers would undo each other's changes."""
    if agent is None or force or agent.get("table") != table:
        return None
    where = f"network namespace {netns!r}" if netns else "the host"
    return (
        f"table {table} in {where} is managed by the offloadctl agent (pid"
        f" {agent.get('pid')}, config {agent.get('config_path')}): edit that file and run"
        " 'offloadctl reload', or pass --force (the agent then restores its config"
        f" within {agent.get('drift_check_seconds', '?')} s)"
    )


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

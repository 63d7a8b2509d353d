"""Declarative configuration: the models that parse user input.

Parse, don't validate: once a :class:`Config` exists, every name is a legal
interface name, every reference resolves and every VLAN stack is at most two
tags deep. Code past this module never re-checks those facts.

All models are frozen, strict (no silent coercion of ``"1"`` to ``1``) and
reject unknown keys, so a typo in a config file is an error, not a no-op.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

__all__ = [
    "Config",
    "DnatRule",
    "FieldErrors",
    "Flowtable",
    "InvalidationConfig",
    "L4Proto",
    "Masquerade",
    "NatConfig",
    "OffloadPolicy",
    "ReuseportConfig",
    "ReuseportGroup",
    "SnatRule",
    "TableConfig",
    "Vlan",
    "VlanProto",
]

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_OBJNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


def _check_ifname(name: str) -> str:
    # The kernel's dev_valid_name() allows more, but these are the characters
    # that survive nft, shell and YAML without quoting surprises.
    if not _IFNAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid interface name {name!r}: use 1-15 characters of A-Z a-z 0-9 _ . -"
        )
    if name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r}")
    return name


def _check_objname(name: str) -> str:
    if not _OBJNAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid name {name!r}: start with a letter, then up to 62 of A-Z a-z 0-9 _ -"
        )
    return name


def _parse_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError("expected a prefix such as 192.0.2.0/24 or 2001:db8::/32")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid prefix {value!r}: {exc}") from None


def _parse_address(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise ValueError("expected an IP address such as 192.0.2.1")
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"invalid address {value!r}: {exc}") from None


IfName = Annotated[str, AfterValidator(_check_ifname)]
ObjName = Annotated[str, AfterValidator(_check_objname)]
# Prefixes and addresses come from YAML/JSON as strings; parse them ourselves
# (strict=True would demand ipaddress objects) and serialise back to strings.
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(_parse_network),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "format": "ip-prefix"}),
]
Address = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    BeforeValidator(_parse_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "format": "ip-address"}),
]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


Loc = tuple[str | int, ...]


class FieldErrors(ValueError):
    """Errors found by a cross-field check, each with its path below the model.

    Pydantic reports a model validator's error at the model itself; carrying
    the precise sub-paths lets ``offloadctl validate`` name ``devices[2]``.
    """

    def __init__(self, issues: list[tuple[Loc, str]]) -> None:
        self.issues = issues
        super().__init__("; ".join(f"{_loc_str(loc)}: {msg}" for loc, msg in issues))


def _loc_str(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _raise(issues: list[tuple[Loc, str]]) -> None:
    if issues:
        raise FieldErrors(issues)


def _duplicates(items: list[str], field: str, what: str) -> list[tuple[Loc, str]]:
    seen: dict[str, int] = {}
    issues: list[tuple[Loc, str]] = []
    for i, item in enumerate(items):
        if item in seen:
            issues.append(((field, i), f"duplicate {what} {item!r} (also at [{seen[item]}])"))
        else:
            seen[item] = i
    return issues


class L4Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class VlanProto(StrEnum):
    DOT1Q = "802.1q"
    DOT1AD = "802.1ad"


class TableConfig(_Model):
    """The one nftables table the control plane owns; nothing else is touched."""

    family: Literal["inet"] = "inet"
    name: ObjName = "offload"


class Flowtable(_Model):
    name: ObjName
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    devices: list[IfName] = Field(default_factory=list)
    bridges: list[IfName] = Field(
        default_factory=list,
        description="bridges whose ports join this flowtable (resolved when applying)",
    )
    hw_offload: bool = False
    counter: bool = True

    @model_validator(mode="after")
    def _devices(self) -> Flowtable:
        issues = _duplicates(self.devices, "devices", "device")
        issues += _duplicates(self.bridges, "bridges", "bridge")
        if not self.devices and not self.bridges:
            issues.append((("devices",), "a flowtable needs at least one device or bridge"))
        _raise(issues)
        return self


class OffloadPolicy(_Model):
    """Which forwarded traffic is put into which flowtable, and when."""

    name: ObjName
    flowtable: ObjName
    protocols: list[L4Proto] = Field(
        default_factory=lambda: [L4Proto.TCP, L4Proto.UDP], min_length=1
    )
    iifnames: list[IfName] = Field(default_factory=list)
    oifnames: list[IfName] = Field(default_factory=list)
    saddr: list[Network] = Field(default_factory=list)
    daddr: list[Network] = Field(default_factory=list)
    min_packets: Annotated[int, Field(ge=0, le=2**32 - 1)] = Field(
        default=0, description="offload only once the connection has seen more packets"
    )

    @model_validator(mode="after")
    def _lists(self) -> OffloadPolicy:
        _raise(
            _duplicates([p.value for p in self.protocols], "protocols", "protocol")
            + _duplicates(self.iifnames, "iifnames", "interface")
            + _duplicates(self.oifnames, "oifnames", "interface")
            + _duplicates([str(n) for n in self.saddr], "saddr", "prefix")
            + _duplicates([str(n) for n in self.daddr], "daddr", "prefix")
        )
        return self



class Masquerade(_Model):
    oifname: IfName
    saddr: list[Network] = Field(default_factory=list)


class SnatRule(_Model):
    oifname: IfName
    to: Address
    saddr: list[Network] = Field(default_factory=list)


class DnatRule(_Model):
    """A port forward: traffic arriving on ``iifname`` for ``port`` goes to ``to``."""

    iifname: IfName
    protocol: L4Proto = L4Proto.TCP
    port: Port
    to: Address
    to_port: Port | None = None


class NatConfig(_Model):
    masquerade: list[Masquerade] = Field(default_factory=list)
    snat: list[SnatRule] = Field(default_factory=list)
    dnat: list[DnatRule] = Field(default_factory=list)
    guard: bool = Field(
        default=True,
        description=(
            "drop new non-SYN TCP arriving on NAT outside interfaces for the router itself,"
            " so a reply that races a flow teardown is not answered with a RST"
        ),
    )

    @model_validator(mode="after")
    def _dnat_unique(self) -> NatConfig:
        keys = [f"{d.iifname} {d.protocol} {d.port}" for d in self.dnat]
        _raise(_duplicates(keys, "dnat", "port forward"))
        return self

    def outside_interfaces(self) -> list[str]:
        names = [m.oifname for m in self.masquerade] + [s.oifname for s in self.snat]
        return sorted(set(names))


class Vlan(_Model):
    """A VLAN sub-interface the topology uses; ``parent`` may itself be a VLAN (QinQ)."""

    name: IfName
    parent: IfName
    id: Annotated[int, Field(ge=1, le=4094)]
    protocol: VlanProto = VlanProto.DOT1Q


class ReuseportGroup(_Model):
    name: ObjName
    max_listeners: Annotated[int, Field(ge=1, le=4096)] = 64
    drop_when_no_target: bool = Field(
        default=False,
        description="reset migrating connections when no newer generation is active",
    )


class ReuseportConfig(_Model):
    bpffs: str = "/sys/fs/bpf"
    groups: list[ReuseportGroup] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> ReuseportConfig:
        issues = _duplicates([g.name for g in self.groups], "groups", "group")
        if not self.bpffs.startswith("/"):
            issues.append((("bpffs",), "must be an absolute path"))
        _raise(issues)
        return self


class InvalidationConfig(_Model):
    enabled: bool = True
    watch: list[Literal["fdb", "neigh", "route", "link"]] = Field(
        default_factory=lambda: ["fdb", "neigh", "route", "link"]  # type: ignore[arg-type]
    )
    queue_size: Annotated[int, Field(ge=64, le=1_048_576)] = 65_536
    rcvbuf_bytes: Annotated[int, Field(ge=65_536, le=1 << 30)] = 32 << 20

    @model_validator(mode="after")
    def _watch(self) -> InvalidationConfig:
        _raise(_duplicates(list(self.watch), "watch", "watch kind"))
        return self


class Config(_Model):
    version: Literal[1]
    table: TableConfig = Field(default_factory=TableConfig)
    flowtables: list[Flowtable] = Field(default_factory=list)
    policies: list[OffloadPolicy] = Field(default_factory=list)
    nat: NatConfig = Field(default_factory=NatConfig)
    vlans: list[Vlan] = Field(default_factory=list)
    reuseport: ReuseportConfig = Field(default_factory=ReuseportConfig)
    invalidation: InvalidationConfig = Field(default_factory=InvalidationConfig)

    @model_validator(mode="after")
    def _references(self) -> Config:
        issues = _duplicates([f.name for f in self.flowtables], "flowtables", "flowtable name")
        issues += _duplicates([p.name for p in self.policies], "policies", "policy name")
        issues += _duplicates([v.name for v in self.vlans], "vlans", "vlan name")
        owner: dict[str, str] = {}
        for i, ft in enumerate(self.flowtables):
            for j, dev in enumerate(ft.devices):
                if dev in owner and owner[dev] != ft.name:
                    issues.append(
                        (
                            ("flowtables", i, "devices", j),
                            f"device {dev!r} is already in flowtable {owner[dev]!r};"
                            " the kernel allows a device in one flowtable per table",
                        )
                    )
                owner.setdefault(dev, ft.name)
        names = {f.name for f in self.flowtables}
        for i, pol in enumerate(self.policies):
            if pol.flowtable not in names:
                known = ", ".join(sorted(names)) or "none defined"
                issues.append(
                    (
                        ("policies", i, "flowtable"),
                        f"unknown flowtable {pol.flowtable!r} (known: {known})",
                    )
                )
        issues += self._vlan_issues()
        _raise(issues)
        return self

    def _vlan_issues(self) -> list[tuple[Loc, str]]:
        by_name = {v.name: v for v in self.vlans}
        issues: list[tuple[Loc, str]] = []
        for i, vlan in enumerate(self.vlans):
            if vlan.parent == vlan.name:
                issues.append((("vlans", i, "parent"), "a VLAN cannot be its own parent"))
                continue
            depth, cur, seen = 1, vlan, {vlan.name}
            while cur.parent in by_name:
                cur = by_name[cur.parent]
                if cur.name in seen:
                    issues.append((("vlans", i, "parent"), "VLAN parents form a loop"))
                    break
                seen.add(cur.name)
                depth += 1
            else:
                if depth > 2:
                    issues.append(
                        (
                            ("vlans", i, "parent"),
                            f"{vlan.name!r} would carry {depth} VLAN tags; at most two (QinQ)",
                        )
                    )
        keys = [f"{v.parent} {v.protocol} id {v.id}" for v in self.vlans]
        issues += [
            (("vlans", loc[1]), msg) for loc, msg in _duplicates(keys, "vlans", "VLAN on parent")
        ]
        return issues

    def vlan_tags(self, name: str) -> list[Vlan]:
        """The VLAN stack of ``name``, outermost tag first (empty if not a VLAN)."""
        by_name = {v.name: v for v in self.vlans}
        stack: list[Vlan] = []
        while name in by_name:
            stack.append(by_name[name])
            name = by_name[name].parent
        return list(reversed(stack))

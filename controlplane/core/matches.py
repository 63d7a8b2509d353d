"""The match table: every way a config entry picks traffic, declared once.

One :class:`Match` per config field that becomes an nft match: the entry kinds
that have it (``policies`` and ``forward.accept``), the parser's checks of its
values (functions of ``config.py``) and the statement it renders (built by a
``core/nft.py`` builder, which makes the nft JSON, the nft text and the form
``nft list`` prints back together). ``config.py`` validates and ``render.py``
renders through this table alone; the plan compares the listed forms the
statements carry.

Adding a match: one entry in :data:`MATCHES` (in the order its statement
stands in a rule), its typed field on the models of ``on`` (pydantic and mypy
read fields from the class), and an example with its golden under ``nft/``.
``tests/unit/test_matches.py`` fails until the field and a golden exist.

The relations between matches live here too (:data:`RELATIONS`): a rule is
rendered once per IP family its address matches allow, and ports are read from
the one protocol's header (``tcp dport``) or, with several, from ``th``.

Imported by ``config.py`` only while validating (config is loaded by then);
``core/nft.py`` is imported when a statement is first built, so ``validate``
never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from controlplane.config import (
    ForwardAccept,
    Loc,
    OffloadPolicy,
    duplicate_issues,
    family_issues,
    icmp_family_issues,
    port_issues,
    prefix_issues,
)

if TYPE_CHECKING:
    from controlplane.core.nft import Stmt

__all__ = [
    "MATCHES",
    "RELATIONS",
    "Entry",
    "Kind",
    "Match",
    "families",
    "issues",
    "rules",
    "statement",
]

Kind = Literal["policy", "accept"]
Entry = OffloadPolicy | ForwardAccept
Net = IPv4Network | IPv6Network
Issue = tuple[Loc, str]

KINDS: dict[type[Entry], Kind] = {OffloadPolicy: "policy", ForwardAccept: "accept"}
BOTH: frozenset[Kind] = frozenset({"policy", "accept"})

# nft lists a protocol by its /etc/protocols name (ICMPv6 as "ipv6-icmp").
NFT_PROTOCOL = {"icmpv6": "ipv6-icmp"}


class Match(NamedTuple):
    """One config field that becomes one nft match statement. An empty or zero
    value matches anything: no statement (``stmt`` only sees other values)."""

    field: str  # the config key, the same on every kind in ``on``
    on: frozenset[Kind]
    # (value, the rule's IP family or None, the header ports are read from:
    # "tcp"/"udp" or "th", see header()) -> the statement; None: none here
    stmt: Callable[[Any, int | None, str], Stmt | None]
    check: Callable[[Any, str], list[Issue]] | None = None  # the values' issues; None: typed only
    address: bool = False  # a prefix list: one rule per IP family it allows


# core/nft.py (and hashlib with it) is bound on the first rendering, not at the
# top: config.py validates through this table, and `validate` never loads nft.
if TYPE_CHECKING:
    from controlplane.core import nft
else:
    nft = None


def _bind_nft() -> None:
    global nft
    from controlplane.core import nft


def _meta(key: str) -> Callable[[list[str], int | None, str], Stmt | None]:
    def build(names: list[str], version: int | None, header: str) -> Stmt:
        return nft.match_meta(key, names)

    return build


def _prefixes(key: str) -> Callable[[list[Net], int | None, str], Stmt | None]:
    def build(nets: list[Net], version: int | None, header: str) -> Stmt | None:
        mine = [n for n in nets if n.version == version]
        return nft.match_prefixes(key, mine) if mine else None  # type: ignore[arg-type]

    return build


def _ports(key: str) -> Callable[[list[tuple[int, int]], int | None, str], Stmt | None]:
    def build(ranges: list[tuple[int, int]], version: int | None, header: str) -> Stmt:
        return nft.match_ports(header, key, ranges)

    return build


def _protocols(protocols: list[str], version: int | None, header: str) -> Stmt | None:
    if header != "th":  # "tcp dport 80" implies "meta l4proto tcp" (nft drops it)
        return None
    return nft.match_l4proto([NFT_PROTOCOL.get(p, p) for p in protocols])


def _packets_over(n: int, version: int | None, header: str) -> Stmt:
    return nft.match_ct_packets_over(n)


def _dups(what: str) -> Callable[[list[str], str], list[Issue]]:
    return lambda values, field: duplicate_issues(values, field, what)


# In the order the statements stand in a rule (drift is judged on the listed
# rule, so a new order would replace every existing rule once).
MATCHES: tuple[Match, ...] = (
    Match("iifnames", BOTH, _meta("iifname"), _dups("interface")),
    Match("oifnames", BOTH, _meta("oifname"), _dups("interface")),
    Match("saddr", BOTH, _prefixes("saddr"), prefix_issues, address=True),
    Match("daddr", BOTH, _prefixes("daddr"), prefix_issues, address=True),
    Match("protocols", BOTH, _protocols, _dups("protocol")),
    Match("dport", BOTH, _ports("dport"), port_issues),
    Match("sport", BOTH, _ports("sport"), port_issues),
    Match("min_packets", frozenset({"policy"}), _packets_over),
)


class Relation(NamedTuple):
    """A check across several matches of one entry."""

    on: frozenset[Kind]
    check: Callable[[Any], list[Issue]]


def _ports_need_l4(acc: ForwardAccept) -> list[Issue]:
    if acc.protocols and not set(acc.protocols) - {"tcp", "udp"}:
        return []
    return [
        ((key,), "ports need protocols limited to tcp and/or udp")
        for key in ("dport", "sport")
        if getattr(acc, key)
    ]


RELATIONS: tuple[Relation, ...] = (
    # a rule is rendered once per family: a prefix the other list cannot match is lost
    Relation(BOTH, lambda e: family_issues(e.saddr, e.daddr)),
    Relation(
        frozenset({"accept"}), lambda e: icmp_family_issues(list(e.protocols), e.saddr, e.daddr)
    ),
    # (a policy's protocols are tcp/udp by type)
    Relation(frozenset({"accept"}), _ports_need_l4),
)


_OF: dict[Kind, tuple[Match, ...]] = {k: tuple(m for m in MATCHES if k in m.on) for k in BOTH}


def of(kind: Kind) -> tuple[Match, ...]:
    """The matches entries of ``kind`` have, in the table's order."""
    return _OF[kind]


def issues(entry: Entry) -> list[Issue]:
    """Every problem of ``entry``'s matches (each with its path below the entry)."""
    kind = KINDS[type(entry)]
    out: list[Issue] = []
    for check, field in _CHECKS[kind]:
        if value := getattr(entry, field):  # an empty value has nothing to check
            out += check(value, field)
    for related in _RELATED[kind]:
        out += related(entry)
    return out


_CHECKS = {k: tuple((m.check, m.field) for m in _OF[k] if m.check is not None) for k in BOTH}
_RELATED = {k: tuple(r.check for r in RELATIONS if k in r.on) for k in BOTH}


def families(entry: Entry) -> list[int | None]:
    """The IP families ``entry`` is rendered for: every family its address
    matches allow (a list that is set but lacks a family excludes it); None,
    any family, when it has none."""
    v4 = v6 = True
    found = False
    for m in _ADDRESSES[KINDS[type(entry)]]:
        if nets := getattr(entry, m.field):
            found = True
            versions = {n.version for n in nets}
            v4, v6 = v4 and 4 in versions, v6 and 6 in versions
    if not found:
        return [None]
    return [4, 6] if v4 and v6 else [4] if v4 else [6] if v6 else []


_ADDRESSES: dict[Kind, tuple[Match, ...]] = {k: tuple(m for m in _OF[k] if m.address) for k in BOTH}


def header(entry: Entry) -> str:
    """Where port matches read ports: one protocol's own header (``tcp dport``,
    as nft lists it), else the transport header after ``meta l4proto``."""
    protocols = entry.protocols
    return protocols[0] if len(protocols) == 1 and (entry.dport or entry.sport) else "th"


def rules(entry: Entry) -> list[tuple[int | None, list[Stmt]]]:
    """``entry``'s match statements, one list per IP family it is rendered for
    (:func:`families`), in the table's order."""
    if nft is None:
        _bind_nft()
    kind = KINDS[type(entry)]
    head = header(entry)
    # A policy without ports has led with its protocols since before ports
    # existed (issue 9): kept, so existing rules keep their tags.
    lead = kind == "policy" and not (entry.dport or entry.sport)
    # Built once: every statement but the address matches' (built per family).
    # (None, statement) or, for an address match, (the match, its value)
    slots: list[tuple[Match | None, Any]] = []
    for m in _OF[kind]:
        value = getattr(entry, m.field)
        if not value:
            continue
        if m.address:
            slots.append((m, value))
        elif (stmt := m.stmt(value, None, head)) is None:
            continue
        elif lead and m.field == "protocols":
            slots.insert(0, (None, stmt))
        else:
            slots.append((None, stmt))
    out: list[tuple[int | None, list[Stmt]]] = []
    for version in families(entry):
        stmts: list[Stmt] = []
        for address, value in slots:
            if address is None:
                stmts.append(value)
            elif (built := address.stmt(value, version, head)) is not None:
                stmts.append(built)
        out.append((version, stmts))
    return out


def statement(m: Match, entry: Entry, version: int | None) -> Stmt | None:
    """The one statement ``m`` renders for ``entry`` in one IP family (None: none)."""
    if nft is None:
        _bind_nft()
    value = getattr(entry, m.field)
    return m.stmt(value, version, header(entry)) if value else None

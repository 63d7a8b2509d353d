"""The nftables object model: frozen values rendered to libnftables JSON and to nft text.

Every statement carries both forms, built side by side in one place, so the
JSON we send and the text we show (or send, see ``needs_text``) cannot drift.
Names reaching this module are already validated (``controlplane.config``),
so quoting is only ever about nft's grammar, never about injection.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, ClassVar, Generic, TypeVar, overload

from controlplane.config import check_ifname, check_objname
from controlplane.errors import PlanError

JSON = Any  # a JSON-serialisable value
T = TypeVar("T")


class _once(Generic[T]):
    """``functools.cached_property`` without the lock Python 3.11 takes on every
    first access (~7 M instructions for the tags and texts of 1,000 rules).
    Same semantics: computed once, kept in the instance's ``__dict__`` (which a
    frozen dataclass allows), found there on later reads."""

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn, self.name = fn, fn.__name__
        self.__doc__ = fn.__doc__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _once[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object, owner: type | None = None) -> T | _once[T]:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


TAG_PREFIX = "cp:"


@dataclass(frozen=True)
class Stmt:
    """One nft expression/statement: its JSON object and its text, made together.

    Identity is the text (canonical: one builder per statement kind); the JSON
    object rides along and is never mutated. ``shown`` is how ``nft list``
    prints the statement back when that differs from the text beyond the order
    of set elements (see :attr:`listed`); the builder that writes a statement
    is the one place that knows.
    """

    text: str
    json: JSON = field(compare=False, hash=False, repr=False)
    shown: str | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def listed(self) -> str:
        """This statement as ``nft list`` prints it (anonymous set elements sorted)."""
        return _sorted_sets(self.text if self.shown is None else self.shown)


def _stmt(obj: JSON, text: str) -> Stmt:
    return Stmt(text, obj)


def _quote(name: str) -> str:
    return f'"{name}"'


def _rhs(values: list[JSON], texts: list[str]) -> tuple[JSON, str]:
    if len(values) == 1:
        return values[0], texts[0]
    return {"set": values}, "{ " + ", ".join(texts) + " }"


def match_meta(key: str, values: list[str], quote: bool = True) -> Stmt:
    return _match_meta(key, tuple(values), quote, "==")


def match_meta_not(key: str, values: list[str]) -> Stmt:
    return _match_meta(key, tuple(values), True, "!=")


# Interface matches repeat across rules (1,000 port forwards on one wan0): each
# distinct one is built once and shared, as a Stmt and its JSON are never mutated.
@lru_cache(maxsize=1024)
def _match_meta(key: str, values: tuple[str, ...], quote: bool, op: str) -> Stmt:
    rhs, text = _rhs(list(values), [_quote(v) if quote else v for v in values])
    shown = f"{key} {text}" if op == "==" else f"{key} {op} {text}"
    return Stmt(shown, {"match": {"op": op, "left": {"meta": {"key": key}}, "right": rhs}})


def match_l4proto(protos: list[str]) -> Stmt:
    rhs, text = _rhs(list(protos), list(protos))
    return _stmt(
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": rhs}},
        f"meta l4proto {text}",
    )


def _nfproto(name: str) -> Stmt:
    return _stmt(
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": name}},
        f"meta nfproto {name}",
    )


# Built once: nearly every NAT rule carries one (a Stmt and its JSON are never mutated).
_NFPROTO = {4: _nfproto("ipv4"), 6: _nfproto("ipv6")}


def match_nfproto(version: int) -> Stmt:
    return _NFPROTO[4 if version == 4 else 6]


def match_prefixes(fieldname: str, nets: list[IPv4Network] | list[IPv6Network]) -> Stmt:
    proto = "ip" if nets[0].version == 4 else "ip6"
    values: list[JSON] = []
    texts: list[str] = []
    for net in nets:
        if net.prefixlen == net.max_prefixlen:
            values.append(str(net.network_address))
        else:
            values.append({"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
        texts.append(str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net))
    return _match_payload(proto, fieldname, values, texts)


def _match_payload(proto: str, fieldname: str, values: list[JSON], texts: list[str]) -> Stmt:
    """``PROTO FIELD VALUE`` or ``PROTO FIELD { VALUE, ... }``."""
    rhs, text = _rhs(values, texts)
    return _stmt(
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": proto, "field": fieldname}},
                "right": rhs,
            }
        },
        f"{proto} {fieldname} {text}",
    )


def match_dport(proto: str, port: int) -> Stmt:
    # One per port forward: Stmt(...) directly (no _stmt hop) on this hot path.
    return Stmt(
        f"{proto} dport {port}",
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": proto, "field": "dport"}},
                "right": port,
            }
        },
    )


def match_ct_packets_over(n: int) -> Stmt:
    return _stmt(
        {"match": {"op": ">", "left": {"ct": {"key": "packets"}}, "right": n}},
        f"ct packets > {n}",
    )


def match_ct_state_new() -> Stmt:
    return _stmt(
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, "ct state new"
    )


def match_tcp_not_syn() -> Stmt:
    flags = ["fin", "syn", "rst", "ack"]
    return Stmt(
        "tcp flags & (fin | syn | rst | ack) != syn",
        {
            "match": {
                "op": "!=",
                "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, flags]},
                "right": "syn",
            }
        },
        # nft lists it in its own short form; ours is the readable one (goldens)
        "tcp flags != syn / fin,syn,rst,ack",
    )


def match_ports(proto: str, fieldname: str, ranges: list[tuple[int, int]]) -> Stmt:
    """``tcp dport { 22, 1000-2000 }``; ``proto`` "th" matches any transport header
    (use it after ``meta l4proto`` names the protocols)."""
    values: list[JSON] = []
    texts: list[str] = []
    for low, high in ranges:
        values.append(low if low == high else {"range": [low, high]})
        texts.append(str(low) if low == high else f"{low}-{high}")
    return _match_payload(proto, fieldname, values, texts)


def match_ct_state(states: list[str]) -> Stmt:
    return _stmt(
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": list(states)}},
        "ct state " + ",".join(states),
    )


def match_ct_status(status: str) -> Stmt:
    return _stmt(
        {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": status}},
        f"ct status {status}",
    )


# IPS_OFFLOAD (nf_conntrack_common.h): nft 1.0.x has no keyword for it, so the
# bit goes as a number in both grammars (listed back as "ct status 0x4000").
IPS_OFFLOAD = 0x4000


def match_ct_offloaded() -> Stmt:
    return _stmt(
        {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": IPS_OFFLOAD}},
        f"ct status {IPS_OFFLOAD:#x}",
    )


def counter_map(key: str, counters: dict[str, str]) -> Stmt:
    """``counter name iifname map { "dev" : "cnt", ... }``: one named counter per key.

    An objref map: one rule counts per device instead of one rule per device
    (nft 1.0.6 / kernel 6.1 accept it in JSON and text alike)."""
    items = sorted(counters.items())
    return _stmt(
        {
            "counter": {
                "map": {"key": {"meta": {"key": key}}, "data": {"set": [[k, v] for k, v in items]}}
            }
        },
        f"counter name {key} map {{ "
        + ", ".join(f"{_quote(k)} : {_quote(v)}" for k, v in items)
        + " }",
    )


def counter(name: str | None = None) -> Stmt:
    if name is None:
        return _stmt({"counter": None}, "counter")
    return _stmt({"counter": name}, f"counter name {_quote(name)}")


def flow_add(flowtable: str) -> Stmt:
    return _stmt({"flow": {"op": "add", "flowtable": f"@{flowtable}"}}, f"flow add @{flowtable}")


def masquerade() -> Stmt:
    return _stmt({"masquerade": None}, "masquerade")


def snat(addr: IPv4Address | IPv6Address) -> Stmt:
    fam = "ip" if addr.version == 4 else "ip6"
    text = str(addr)  # once: ipaddress formats on every str()
    if addr.version == 4:
        return _stmt({"snat": {"family": fam, "addr": text}}, f"snat {fam} to {text}")
    # an IPv6 address without a port is listed without brackets
    return Stmt(
        f"snat {fam} to [{text}]", {"snat": {"family": fam, "addr": text}}, f"snat {fam} to {text}"
    )


def dnat(addr: IPv4Address | IPv6Address, port: int | None) -> Stmt:
    fam = "ip" if addr.version == 4 else "ip6"
    text = str(addr)
    obj: dict[str, JSON] = {"family": fam, "addr": text}
    shown = text if addr.version == 4 else f"[{text}]"
    if port is not None:
        obj["port"] = port
        shown += f":{port}"
    elif addr.version == 6:  # listed without brackets when there is no port
        return Stmt(f"dnat {fam} to {shown}", {"dnat": obj}, f"dnat {fam} to {text}")
    return Stmt(f"dnat {fam} to {shown}", {"dnat": obj})


def verdict(kind: str) -> Stmt:
    assert kind in ("accept", "drop")
    return _stmt({kind: None}, kind)


class Hook(StrEnum):
    PREROUTING = "prerouting"
    INPUT = "input"
    FORWARD = "forward"
    POSTROUTING = "postrouting"


# --- names: the only strings that reach nft command text unquoted -------------
#
# Every name the model holds passes the config's own parsers (ObjName, IfName),
# whether it came from a config, a flag or a kernel listing. A name that fails
# here is our bug (the caller should have parsed it first): PlanError, exit 70.

FAMILIES = frozenset({"inet", "ip", "ip6", "arp", "bridge", "netdev"})


def is_objname(name: str) -> bool:
    """Whether ``name`` passes the config's ObjName parser."""
    try:
        check_objname(name)
    except (ValueError, TypeError):  # TypeError: not a string
        return False
    return True


def is_ifname(name: str) -> bool:
    """Whether ``name`` passes the config's IfName parser."""
    try:
        check_ifname(name)
    except (ValueError, TypeError):
        return False
    return True


def _require(ok: bool, what: str, value: object) -> None:
    if not ok:
        raise PlanError(f"{what} {value!r} did not pass the config's name parser")


def _safe_comment(text: str) -> bool:
    return '"' not in text and "\n" not in text and "\\" not in text and len(text) <= 128


# --- ownership marker and the compare-and-swap serial ---------------------------

SCHEMA = 1
MARKER_PREFIX = "managed by offloadctl; schema "
TABLE_MARKER = f"{MARKER_PREFIX}{SCHEMA}"
# A set only we create, holding one number that every committing transaction
# swaps (delete N, add N+1): a transaction planned against an older listing
# finds N gone and the kernel refuses the whole batch (ENOENT).
SERIAL_SET = "offloadctl_serial"
SERIAL_MAX = 65535


def next_serial(serial: int) -> int:
    return serial % SERIAL_MAX + 1


# --- canonical text: how nft lists what we send ----------------------------------

_ANON_SET = re.compile(r"\{ ([^{}]*) \}")


def sort_set_elements(text: str) -> str:
    """Anonymous set elements in a stable order (the kernel lists them in its own)."""
    return _ANON_SET.sub(lambda m: "{ " + ", ".join(sorted(m.group(1).split(", "))) + " }", text)


@lru_cache(maxsize=4096)
def _sorted_sets(text: str) -> str:
    # Statements repeat across rules (interfaces, verdicts): canonicalise each once.
    return sort_set_elements(text) if "{ " in text else text


def canonical_body(stmts: tuple[Stmt, ...]) -> str:
    """The rule body as ``nft list`` shows it (stateless), set elements sorted."""
    out: list[str] = []
    for i, s in enumerate(stmts):
        t = s.text
        if t in ("meta nfproto ipv4", "meta nfproto ipv6"):
            proto = "ip " if t.endswith("4") else "ip6 "
            # nft drops a protocol dependency that a later match implies
            if any(later.text.startswith(proto) for later in stmts[i + 1 :]):
                continue
        out.append(s.listed)
    return " ".join(out)


class FlowtableDefinition:
    """What of a flowtable cannot change in place (a change means delete and
    recreate): the same for the one we want (:class:`Flowtable`) and the one
    listed (``plan.ObservedFlowtable``)."""

    priority: int
    hw_offload: bool
    counter: bool

    @property
    def definition(self) -> tuple[int, bool, bool]:
        return (self.priority, self.hw_offload, self.counter)


@dataclass(frozen=True)
class Flowtable(FlowtableDefinition):
    name: str
    priority: int
    devices: tuple[str, ...]  # sorted
    hw_offload: bool = False
    counter: bool = False

    def __post_init__(self) -> None:
        _require(is_objname(self.name), "flowtable name", self.name)
        for dev in self.devices:
            _require(is_ifname(dev), "device name", dev)


@dataclass(frozen=True)
class Chain:
    name: str
    type: str
    hook: Hook
    priority: int
    policy: str = "accept"

    def __post_init__(self) -> None:
        _require(is_objname(self.name), "chain name", self.name)
        _require(self.type in ("filter", "nat", "route"), "chain type", self.type)
        _require(self.policy in ("accept", "drop"), "chain policy", self.policy)

    @property
    def definition(self) -> tuple[str, str, int, str]:
        return (self.type, self.hook.value, self.priority, self.policy)


@dataclass(frozen=True)
class Rule:
    chain: str
    stmts: tuple[Stmt, ...]
    label: str  # a human hint kept in the comment, e.g. "policy lan-wan"

    def __post_init__(self) -> None:
        _require(_safe_comment(self.label), "rule label", self.label)

    @_once
    def tag(self) -> str:
        """Content hash: names our own rules in the kernel's listing (for people;
        drift is judged on the listed content, see :attr:`listed`)."""
        body = "\0".join([self.chain, self.label, *(s.text for s in self.stmts)])
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    @property
    def comment(self) -> str:
        return f"{TAG_PREFIX}{self.tag} {self.label}".strip()

    @_once
    def text(self) -> str:
        return " ".join([s.text for s in self.stmts]) + f' comment "{self.comment}"'

    @_once
    def listed(self) -> str:
        """This rule as ``nft -s list`` prints it: what drift detection compares."""
        return canonical_body(self.stmts) + (f" comment {_quote(self.comment)}")

    @property
    def flowtable_ref(self) -> str | None:
        for s in self.stmts:
            obj = s.json
            if isinstance(obj, dict) and "flow" in obj:
                return str(obj["flow"]["flowtable"]).removeprefix("@")
        return None


@dataclass(frozen=True)
class Ruleset:
    """The complete desired content of the owned table."""

    family: str
    table: str
    flowtables: tuple[Flowtable, ...] = ()
    counters: tuple[str, ...] = ()
    chains: tuple[Chain, ...] = ()
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        _require(self.family in FAMILIES, "family", self.family)
        _require(is_objname(self.table), "table name", self.table)
        for c in self.counters:
            _require(is_objname(c), "counter name", c)

    def rules_of(self, chain: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.chain == chain)

    def flowtable(self, name: str) -> Flowtable | None:
        return next((f for f in self.flowtables if f.name == name), None)

    @property
    def ref(self) -> TableRef:
        return TableRef(self.family, self.table)


# --- operations: what a transaction is made of -------------------------------
#
# Transport: nft's text grammar, built here from the typed model (as knftables
# and kube-proxy do). It expresses everything we need (flowtable flags, device
# removal, table comments, deletes by handle), which nft 1.0.x's JSON grammar
# does not, and libnftables parses it ~2x faster than JSON. Injection-proof by
# construction: every name in it passed the config's parsers (see above),
# numbers are ints, comments are checked for quotes.
#
# Each operation is declared, not written: its fields, and a :class:`Form`
# saying how nft spells it. One function writes every command's text and one
# its JSON, so the two grammars are built side by side for every operation.


@dataclass(frozen=True)
class TableRef:
    family: str
    table: str

    def __post_init__(self) -> None:
        _require(self.family in FAMILIES, "family", self.family)
        _require(is_objname(self.table), "table name", self.table)

    @property
    def base(self) -> dict[str, str]:
        return {"family": self.family, "table": self.table}

    @property
    def spec(self) -> str:
        return f"{self.family} {self.table}"


@dataclass(frozen=True)
class Form:
    """How nft spells one kind of operation.

    Text: ``VERB OBJ FAMILY TABLE [REF] [{ BODY }]`` (a table is its own
    object: ``VERB table FAMILY REF``, REF its name unless given), then the
    command of ``then`` on the next line. JSON, when libnftables' JSON grammar
    can say it: ``{VERB: {OBJ: {family, table, **json}}}``.
    """

    verb: str
    obj: str | Callable[[Any], str]
    ref: Callable[[Any], str | None] | None = None  # a name, "handle N"
    body: Callable[[Any], str] | None = None
    json: Callable[[Any], dict[str, JSON]] | None = None  # None: no JSON form
    json_verb: str | None = None  # where JSON spells the verb otherwise
    then: Form | None = None
    needs_text: bool | Callable[[Any], bool] = False  # JSON cannot express it
    names: tuple[tuple[str, str], ...] = ()  # (field, what): must pass ObjName
    devices: str | None = None  # a field of device names: must pass IfName


def _command(form: Form, op: Any, rs: TableRef) -> str:
    obj = form.obj if isinstance(form.obj, str) else form.obj(op)
    ref = form.ref(op) if form.ref is not None else None
    if obj == "table":
        line = f"{form.verb} table {rs.family} {ref or rs.table}"
    else:
        line = f"{form.verb} {obj} {rs.spec}" + (f" {ref}" if ref else "")
    if form.body is not None:
        line += f" {{ {form.body(op)} }}"
    return line if form.then is None else line + "\n" + _command(form.then, op, rs)


def _name(op: Any) -> str:
    return str(op.name)


def _named_json(op: Any) -> dict[str, JSON]:
    return {"name": op.name}


@dataclass(frozen=True)
class Op:
    """Base of transaction operations (knftables-style verbs): a subclass
    declares its fields and its ``FORM``."""

    FORM: ClassVar[Form]

    def __post_init__(self) -> None:
        form = self.FORM
        for attr, what in form.names:
            _require(is_objname(getattr(self, attr)), what, getattr(self, attr))
        for dev in getattr(self, form.devices) if form.devices else ():
            _require(is_ifname(dev), "device name", dev)

    def json(self, rs: TableRef) -> JSON:
        form = self.FORM
        if form.json is None:
            raise NotImplementedError(f"{type(self).__name__} has no libnftables JSON form")
        obj = form.obj if isinstance(form.obj, str) else form.obj(self)
        where = {"family": rs.family, "name": rs.table} if obj == "table" else rs.base
        return {form.json_verb or form.verb: {obj: {**where, **form.json(self)}}}

    def text(self, rs: TableRef) -> str:
        return _command(self.FORM, self, rs)

    @property
    def needs_text(self) -> bool:
        """True when libnftables' JSON grammar cannot express this operation."""
        needs = self.FORM.needs_text
        return needs if isinstance(needs, bool) else needs(self)


@dataclass(frozen=True)
class NamedOp(Op):
    """An operation on one named object of the table, the same in both grammars:
    ``VERB OBJ FAMILY TABLE NAME`` and ``{VERB: {OBJ: {family, table, name}}}``;
    a subclass names its verb and object (``class AddCounter(NamedOp,
    verb="add", obj="counter")``)."""

    name: str

    def __init_subclass__(cls, *, verb: str, obj: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.FORM = Form(verb, obj, _name, json=_named_json, names=(("name", f"{obj} name"),))


def _ft_devices_text(devices: tuple[str, ...]) -> str:
    return "devices = { " + ", ".join(_quote(d) for d in devices) + " };"


@dataclass(frozen=True)
class CreateTable(Op):
    """Create the table carrying our ownership marker, in one conditional step:
    ``create`` fails (EEXIST, the whole batch refused) if a table of that name
    exists, so a table someone made after we listed it absent is never written.
    The marker is a comment, which the kernel only takes at creation."""

    FORM = Form(
        "create",
        "table",
        body=lambda op: f"comment {_quote(TABLE_MARKER)};",
        json=lambda op: {},
        json_verb="add",
    )


@dataclass(frozen=True)
class ResetTableFlags(Op):
    """Clear the table's flags (``dormant`` switches every hook off): nft sends
    the flags on ``add table``, zero when none are given (docs/nft-behaviour.md).
    Only ever after the serial swap, so it cannot create a table that vanished
    meanwhile."""

    FORM = Form("add", "table")


@dataclass(frozen=True)
class DeleteTable(Op):
    """Delete the table; by its kernel handle when known, so a table of the same
    name made since we listed ours (a new handle) is never the one deleted."""

    handle: int = 0

    FORM = Form(
        "delete",
        "table",
        lambda op: f"handle {int(op.handle)}" if op.handle else None,
        json=lambda op: {},
    )


def _serial(verb: str, field: str, then: Form | None = None) -> Form:
    return Form(
        verb, "element", lambda op: SERIAL_SET, lambda op: str(int(getattr(op, field))), then=then
    )


@dataclass(frozen=True)
class AddSerial(Op):
    """Create the compare-and-swap set holding ``value``. ``create`` (not ``add``)
    fails with EEXIST if another writer created it since we listed: two
    writers that both found no table cannot both build one."""

    value: int

    FORM = Form(
        "create",
        "set",
        lambda op: SERIAL_SET,
        lambda op: "type inet_service;",
        then=_serial("add", "value"),
    )


@dataclass(frozen=True)
class SwapSerial(Op):
    """Fails the whole batch (ENOENT) unless the serial is still ``old``."""

    old: int
    new: int

    FORM = _serial("delete", "old", then=_serial("add", "new"))


class ObjKind(StrEnum):
    """Kinds of object nft 1.0.x lists in a table (every one apply may have to
    delete when someone added it by hand)."""

    CHAIN = "chain"
    SET = "set"
    MAP = "map"
    FLOWTABLE = "flowtable"
    COUNTER = "counter"
    QUOTA = "quota"
    LIMIT = "limit"
    CT_HELPER = "ct helper"
    CT_TIMEOUT = "ct timeout"
    CT_EXPECTATION = "ct expectation"
    SECMARK = "secmark"
    SYNPROXY = "synproxy"


# nft 1.0.x's grammar has no "handle" form for these ("syntax error, unexpected
# handle"; docs/nft-behaviour.md): they go by name, which must then pass the
# config's name parser (the plan rebuilds the table instead when it does not).
BY_NAME_ONLY = frozenset({ObjKind.CT_HELPER, ObjKind.CT_TIMEOUT, ObjKind.CT_EXPECTATION})


def _by_handle_obj(op: DeleteByHandle) -> str:
    kind = ObjKind(op.kind)
    # A map is a set to the kernel; "delete map ... handle" is not in the grammar.
    return "set" if kind is ObjKind.MAP else kind.value


def _by_handle_ref(op: DeleteByHandle) -> str:
    return op.name if op.kind in BY_NAME_ONLY else f"handle {int(op.handle)}"


@dataclass(frozen=True)
class DeleteByHandle(Op):
    """Delete an object found in the listing (hand-added): by its kernel handle,
    an int, so no listed name becomes command text (see BY_NAME_ONLY)."""

    kind: ObjKind
    handle: int
    name: str  # for people, and the command for BY_NAME_ONLY kinds

    FORM = Form("delete", _by_handle_obj, _by_handle_ref)

    def __post_init__(self) -> None:
        if self.kind in BY_NAME_ONLY:
            _require(is_objname(self.name), f"{ObjKind(self.kind).value} name", self.name)


def _flowtable_body(op: AddFlowtable) -> str:
    ft = op.ft
    body = f"hook ingress priority {int(ft.priority)};"
    if ft.devices:
        body += " " + _ft_devices_text(ft.devices)
    if ft.hw_offload:
        body += " flags offload;"
    if ft.counter:
        body += " counter;"
    return body


def _flowtable_json(op: AddFlowtable) -> dict[str, JSON]:
    ft = op.ft
    obj: dict[str, JSON] = {"name": ft.name, "hook": "ingress", "prio": ft.priority}
    if ft.devices:
        obj["dev"] = list(ft.devices)
    return obj


@dataclass(frozen=True)
class AddFlowtable(Op):
    """Create a flowtable, or add ``devices`` to an existing one (same verb in nft)."""

    ft: Flowtable

    FORM = Form(
        "add",
        "flowtable",
        lambda op: op.ft.name,
        _flowtable_body,
        _flowtable_json,
        # libnftables-json(5) of nft 1.0.x has no flowtable flags.
        needs_text=lambda op: op.ft.hw_offload or op.ft.counter,
    )


@dataclass(frozen=True)
class DeleteFlowtableDevices(Op):
    name: str
    devices: tuple[str, ...]

    # nft 1.0.x's JSON parser ignores "dev" on delete and would delete the
    # whole flowtable: this operation only exists in the text grammar.
    FORM = Form(
        "delete",
        "flowtable",
        _name,
        lambda op: _ft_devices_text(op.devices),
        needs_text=True,
        names=(("name", "flowtable name"),),
        devices="devices",
    )


class DeleteFlowtable(NamedOp, verb="delete", obj="flowtable"):
    """``delete flowtable FAMILY TABLE NAME``."""


class AddCounter(NamedOp, verb="add", obj="counter"):
    """``add counter FAMILY TABLE NAME``."""


class DeleteCounter(NamedOp, verb="delete", obj="counter"):
    """``delete counter FAMILY TABLE NAME``."""


def _chain_body(op: AddChain) -> str:
    c = op.chain
    return f"type {c.type} hook {Hook(c.hook).value} priority {int(c.priority)}; policy {c.policy};"


def _chain_json(op: AddChain) -> dict[str, JSON]:
    c = op.chain
    return {
        "name": c.name,
        "type": c.type,
        "hook": c.hook.value,
        "prio": c.priority,
        "policy": c.policy,
    }


@dataclass(frozen=True)
class AddChain(Op):
    chain: Chain

    FORM = Form("add", "chain", lambda op: op.chain.name, _chain_body, _chain_json)


class FlushChain(NamedOp, verb="flush", obj="chain"):
    """``flush chain FAMILY TABLE NAME``."""


class DeleteChain(NamedOp, verb="delete", obj="chain"):
    """``delete chain FAMILY TABLE NAME``."""


def _rule_json(op: AddRule) -> dict[str, JSON]:
    r = op.rule
    return {"chain": r.chain, "expr": [s.json for s in r.stmts], "comment": r.comment}


@dataclass(frozen=True)
class AddRule(Op):
    rule: Rule

    FORM = Form("add", "rule", lambda op: f"{op.rule.chain} {op.rule.text}", json=_rule_json)


@dataclass(frozen=True)
class Transaction:
    """An ordered list of operations on one table, applied as one kernel transaction."""

    ref: TableRef
    ops: tuple[Op, ...]

    @property
    def needs_text(self) -> bool:
        return any(op.needs_text for op in self.ops)

    def to_json(self) -> JSON:
        return {
            "nftables": [{"metainfo": {"json_schema_version": 1}}]
            + [op.json(self.ref) for op in self.ops]
        }

    def to_text(self) -> str:
        """What is sent to the kernel: one libnftables call, one batch."""
        return "".join(op.text(self.ref) + "\n" for op in self.ops)

    def __str__(self) -> str:
        return self.to_text()


def create_ops(rs: Ruleset, serial: int = 1) -> list[Op]:
    """Operations that build ``rs`` in an absent table (marker and serial included)."""
    ops: list[Op] = [CreateTable(), AddSerial(serial)]
    ops += [AddCounter(c) for c in rs.counters]
    ops += [AddFlowtable(ft) for ft in rs.flowtables]
    ops += [AddChain(c) for c in rs.chains]
    ops += [AddRule(r) for r in rs.rules]
    return ops


def ruleset_json(rs: Ruleset) -> JSON:
    """The whole table as a libnftables JSON document (``add`` commands), for people
    and tools; what we send is :meth:`Transaction.to_text`."""
    ops: list[Op] = [CreateTable()]
    ops += [AddCounter(c) for c in rs.counters]
    ops += [AddFlowtable(ft) for ft in rs.flowtables]
    ops += [AddChain(c) for c in rs.chains]
    ops += [AddRule(r) for r in rs.rules]
    return Transaction(TableRef(rs.family, rs.table), tuple(ops)).to_json()


def ruleset_text(rs: Ruleset) -> str:
    """The whole table in nft's block syntax, loadable with ``nft -f``."""
    out = [f"table {rs.family} {rs.table} {{"]
    for name in rs.counters:
        out.append(f"\tcounter {name} {{\n\t}}")
    for ft in rs.flowtables:
        out.append(f"\tflowtable {ft.name} {{")
        out.append(f"\t\thook ingress priority {ft.priority};")
        if ft.devices:
            out.append(f"\t\t{_ft_devices_text(ft.devices)}")
        if ft.hw_offload:
            out.append("\t\tflags offload;")
        if ft.counter:
            out.append("\t\tcounter;")
        out.append("\t}")
    for chain in rs.chains:
        out.append(f"\tchain {chain.name} {{")
        out.append(
            f"\t\ttype {chain.type} hook {chain.hook.value} priority {chain.priority};"
            f" policy {chain.policy};"
        )
        out.extend(f"\t\t{r.text}" for r in rs.rules_of(chain.name))
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"

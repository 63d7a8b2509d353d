"""Fuzzing targets (issue 15): the config loader, the control protocol and the
netlink decoders, each fed random bytes, random structure and mutations of
real inputs. The only outcomes allowed are a value or the documented error:

- config loader: a Config, or ConfigError (exit 2);
- control protocol: a Request, or ProtocolError (an error reply);
- netlink decoders: a decoded change, None, or KernelError ("malformed").

Hypothesis drives them (binary and structured strategies; atheris brings no
coverage guidance for code that is pure Python and adds a native dependency).
``make unit`` runs each for a few seconds (OFFLOADCTL_FUZZ_EXAMPLES, default
300); ``make fuzz`` runs them long. A hang shows as hypothesis' deadline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.agent import protocol
from controlplane.errors import ConfigError, KernelError
from controlplane.kernel import netlink
from controlplane.kernel.ctnetlink import conntrack as ct
from controlplane.kernel.rtnl import codec
from controlplane.loader import load_bytes
from tests.unit.test_netlink_codec import (
    CT_ENTRY,
    FDB_DEL,
    FDB_NEW,
    NEIGH_NEW,
    ROUTE_GET_REPLY,
    ROUTE_NEW,
)

EXAMPLES = int(os.environ.get("OFFLOADCTL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per input: a hang or a blow-up fails the run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 300,  # the unit suite is reproducible; `make fuzz` explores
)
ROOT = Path(__file__).parents[2]
SEEDS = sorted(
    p.read_bytes()
    for d in (ROOT / "nft" / "examples", ROOT / "examples" / "configs")
    for p in d.glob("*.yaml")
)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A real input with a few random edits: overwrite, insert, delete, duplicate."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete", "repeat"]))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if op == "set":
            data[at : at + len(chunk)] = chunk
        elif op == "insert":
            data[at:at] = chunk
        elif op == "delete":
            del data[at : at + len(chunk)]
        else:
            data[at:at] = data[max(0, at - 16) : at] * draw(st.integers(1, 50))
    return bytes(data)


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(-(10**30), 10**30)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
        max_leaves=max_leaves,
    )


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """Brackets nested to a random depth (up to far past every bound), maybe unclosed."""
    depth = draw(st.integers(0, 100_000))
    opener = draw(st.sampled_from([b"[", b'{"a":', b"[1,"]))
    closer = b"]" if opener != b'{"a":' else b"}"
    body = opener * depth + b"0" + closer * draw(st.integers(0, depth))
    return body


def long_numbers() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda sign, digits, frac: sign + b"1" * digits + frac,
        st.sampled_from([b"", b"-"]),
        st.integers(1, 6000),
        st.sampled_from([b"", b".5", b"e5", b"e99999"]),
    )


# --- the config loader ------------------------------------------------------------


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=2000),
        mutated(SEEDS),
        json_values().map(lambda v: json.dumps({"version": 1, "x": v}).encode()),
        nested(),
        long_numbers().map(lambda n: b"version: 1\nnat:\n  dnat:\n    - {port: " + n + b"}\n"),
    ),
    st.booleans(),
)
def test_fuzz_config_loader(raw: bytes, json_syntax: bool) -> None:
    try:
        load_bytes(raw, "fuzz", json_syntax=json_syntax)
    except ConfigError as exc:
        assert exc.issues and all("\n" not in str(i) for i in exc.issues)


# --- the control protocol -------------------------------------------------------------

REQUESTS = [protocol.encode_request(op).rstrip(b"\n") for op in protocol.OPS] + [
    protocol.encode_request("flows", limit=5).rstrip(b"\n")
]


@st.composite
def json_objects_with_duplicates(draw: st.DrawFn) -> bytes:
    keys = draw(st.lists(st.sampled_from(["v", "op", "limit", "x"]), min_size=1, max_size=6))
    values = [json.dumps(draw(json_values(5))) for _ in keys]
    return ("{" + ",".join(f'"{k}":{v}' for k, v in zip(keys, values, strict=True)) + "}").encode()


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=protocol.MAX_LINE),
        mutated(REQUESTS),
        json_values().map(lambda v: json.dumps(v).encode()),
        json_objects_with_duplicates(),
        nested().filter(lambda b: len(b) <= protocol.MAX_LINE),
        long_numbers().map(lambda n: b'{"v":1,"op":"flows","limit":' + n + b"}"),
        st.sampled_from(REQUESTS).flatmap(lambda r: st.integers(0, len(r)).map(lambda n: r[:n])),
    )
)
def test_fuzz_control_protocol(line: bytes) -> None:
    try:
        req = protocol.decode_request(line)
    except protocol.ProtocolError as exc:
        answer = json.loads(protocol.error_from(exc))
        assert answer["ok"] is False and answer["error"]["code"] == exc.code
        return
    assert req.op in protocol.OPS and isinstance(req.args, dict)


# --- the netlink decoders ---------------------------------------------------------------

RTNL_SEEDS = [FDB_NEW, FDB_DEL, NEIGH_NEW, ROUTE_NEW]
MSG_TYPES = [
    codec.RTM_NEWLINK,
    codec.RTM_DELLINK,
    codec.RTM_NEWNEIGH,
    codec.RTM_DELNEIGH,
    codec.RTM_NEWROUTE,
    codec.RTM_DELROUTE,
]


@st.composite
def attributes(draw: st.DrawFn, depth: int = 2) -> bytes:
    """Attributes of random types and sizes, some nested (as IFLA_LINKINFO and
    CTA_TUPLE_* are), some with lengths that lie about their payload."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 40) | st.integers(0, 0xFFFF))
        if depth and draw(st.booleans()):
            payload = draw(attributes(depth - 1))
        else:
            payload = draw(st.binary(max_size=24))
        attr = netlink.nla(kind, payload)
        if draw(st.integers(0, 9)) == 0:  # a length that lies
            attr = draw(st.integers(0, 0xFFFF)).to_bytes(2, "little") + attr[2:]
        out += attr
    return out


@st.composite
def rtnl_messages(draw: st.DrawFn) -> bytes:
    header = draw(st.binary(min_size=0, max_size=16))
    return netlink.message(draw(st.sampled_from(MSG_TYPES)), 0, 1, header + draw(attributes()))


@st.composite
def ct_messages(draw: st.DrawFn) -> bytes:
    nfgen = bytes([draw(st.sampled_from([2, 10, 0, 7]))]) + draw(st.binary(min_size=3, max_size=3))
    body = nfgen + draw(attributes(3))
    return netlink.message((1 << 8) | draw(st.sampled_from([0, 2])), 0, 1, body)


def _decode_all(buf: bytes) -> None:
    for kind, _flags, _seq, start, end in netlink.messages(buf):
        codec.decode(kind, buf, start, end)
        if kind in (codec.RTM_NEWROUTE, codec.RTM_DELROUTE):
            codec.decode_route_lookup(buf, start, end)
        ct.decode_entry(buf, start, end)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=512),
        mutated([*RTNL_SEEDS, ROUTE_GET_REPLY, CT_ENTRY]),
        rtnl_messages(),
        ct_messages(),
        st.lists(rtnl_messages() | ct_messages(), max_size=4).map(b"".join),
    )
)
def test_fuzz_netlink_decoders(buf: bytes) -> None:
    try:
        _decode_all(buf)
    except KernelError as exc:
        assert "malformed" in str(exc)


def test_the_seeds_decode() -> None:
    # the mutations start from inputs that parse: a broken seed would fuzz nothing
    for raw in SEEDS:
        load_bytes(raw, "seed")
    for line in REQUESTS:
        protocol.decode_request(line)
    for buf in RTNL_SEEDS:
        assert [codec.decode(k, buf, s, e) for k, _f, _q, s, e in netlink.messages(buf)] != [None]

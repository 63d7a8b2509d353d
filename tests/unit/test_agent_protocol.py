"""The control protocol's codec: every bad request gets a typed error, never an exception."""

from __future__ import annotations

import json

import pytest

from controlplane.agent import protocol
from controlplane.agent.protocol import ProtocolError


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"", "bad_request"),
        (b"garbage", "bad_request"),
        (b"\xff\xfe", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b'"status"', "bad_request"),
        (b'{"op": "status"}', "unsupported_version"),
        (b'{"v": 2, "op": "status"}', "unsupported_version"),
        (b'{"v": true, "op": "status"}', "unsupported_version"),
        (b'{"v": "1", "op": "status"}', "unsupported_version"),
        (b'{"v": 1}', "unknown_op"),
        (b'{"v": 1, "op": "rm -rf"}', "unknown_op"),
        (b'{"v": 1, "op": ["status"]}', "unknown_op"),
        # issue 15 (F8): each of these ended the agent with exit 70, or was accepted
        (b'{"v":1' + b"0" * 5000 + b', "op": "status"}', "bad_request"),
        (b'{"v":1, "op": "flows", "limit": ' + b"9" * 5000 + b"}", "bad_request"),
        (b"[" * 30000, "bad_request"),
        (b'{"v":1, "op": "status", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}", "bad_request"),
        (b'{"v": 1, "op": "status", "op": "reload"}', "bad_request"),
        (b'{"v": 1.0, "op": "status"}', "unsupported_version"),
        (b'{"v": 1e0, "op": "status"}', "unsupported_version"),
        (b'{"v": NaN, "op": "status"}', "bad_request"),
        (b'{"v": 1, "op": "status", "x": -Infinity}', "bad_request"),
        (b'{"v": 1, "op": "st\\u0061tus", "x": 1' + b"0" * 40 + b".5}", "bad_request"),
        (b'{"v": 1, "op": {"a": 1}}', "unknown_op"),
    ],
)
def test_bad_requests(line: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(line)
    assert info.value.code == code
    answer = json.loads(protocol.error_from(info.value))
    assert answer["v"] == 1 and answer["ok"] is False and answer["error"]["code"] == code


def test_version_mismatch_names_supported_versions() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(b'{"v": 9, "op": "status"}')
    assert json.loads(protocol.error_from(info.value))["error"]["supported"] == [1]


def test_round_trip() -> None:
    line = protocol.encode_request("flows", limit=5)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    req = protocol.decode_request(line.rstrip(b"\n"))
    assert req == protocol.Request("flows", {"limit": 5})
    ok = protocol.decode_response(protocol.ok({"a": 1}).rstrip(b"\n"))
    assert ok.ok and ok.result == {"a": 1}
    bad = protocol.decode_response(protocol.error("config_invalid", "no", issues=[]).rstrip())
    assert not bad.ok and bad.error_code == "config_invalid" and bad.error["issues"] == []


@pytest.mark.parametrize(
    "line", [b"nope", b"{}", b'{"ok": "yes", "v": 1}', b'{"ok": true, "v": 2}']
)
def test_bad_answers_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_response(line)


def test_answers_are_one_line_even_with_newlines_in_text() -> None:
    line = protocol.error("internal", "two\nlines")
    assert line.count(b"\n") == 1


def test_nesting_within_the_bound_is_still_a_request() -> None:
    deep = b"[" * (protocol.MAX_DEPTH - 1) + b"]" * (protocol.MAX_DEPTH - 1)
    req = protocol.decode_request(b'{"v": 1, "op": "status", "x": ' + deep + b"}")
    assert req.op == "status"
    # brackets inside strings do not count
    req = protocol.decode_request(b'{"v": 1, "op": "status", "x": "' + b"[" * 5000 + b'"}')
    assert req.args == {"x": "[" * 5000}

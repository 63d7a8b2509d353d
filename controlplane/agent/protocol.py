"""The control socket's protocol, pure: bytes in, values out (no sockets here).

One JSON object per line each way. A request is ``{"v": 1, "op": OP, ...}``;
every answer is ``{"v": 1, "ok": true, "result": {...}}`` or
``{"v": 1, "ok": false, "error": {"code": CODE, "message": TEXT, ...}}``.
A client speaking another version gets ``unsupported_version`` with the
versions we speak, so a newer CLI can fall back or say what to upgrade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from controlplane import boundedjson

VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
MAX_LINE: Final = 64 * 1024  # a request is a few dozen bytes; this bounds a bad client
MAX_RESPONSE: Final = 16 << 20  # a client refuses answers beyond this (flows of a big table)
MAX_DEPTH: Final = 8  # a request is one flat object; a little room for future arguments

Op = Literal["status", "reload", "flows"]
OPS: Final[tuple[Op, ...]] = ("status", "reload", "flows")

ErrorCode = Literal[
    "bad_request",  # not JSON, not an object, missing/invalid fields
    "unsupported_version",
    "unknown_op",
    "line_too_long",
    "permission_denied",
    "config_invalid",  # reload: the new config does not parse (``issues`` has the fields)
    "apply_failed",  # reload: the kernel or environment refused (running config kept)
    "unavailable",  # the agent cannot answer this op right now
    "internal",
]


class ProtocolError(Exception):
    """A request we answer with an error (the connection stays usable unless noted)."""

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class Request:
    op: Op
    args: dict[str, Any] = field(default_factory=dict)


def decode_request(line: bytes) -> Request:
    """One request line (without its newline) -> Request, or ProtocolError.

    Bounded (boundedjson): no line, however long its numbers or deep its
    nesting, raises anything but ProtocolError. Strict: duplicate keys are
    refused, and the version is the integer 1 (not 1.0, not true)."""
    try:
        data = boundedjson.loads(line, max_depth=MAX_DEPTH)
    except boundedjson.JsonRejected as exc:
        raise ProtocolError("bad_request", f"not a JSON object on one line: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "a request is a JSON object")
    version = data.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {_short(version)} is not spoken here",
            supported=list(SUPPORTED_VERSIONS),
        )
    op = data.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {_short(op)}", ops=list(OPS))
    args = {k: v for k, v in data.items() if k not in ("v", "op")}
    return Request(op, args)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def encode_request(op: str, **args: Any) -> bytes:
    return _line({"v": VERSION, "op": op, **args})


def ok(result: dict[str, Any]) -> bytes:
    return _line({"v": VERSION, "ok": True, "result": result})


def error(code: ErrorCode, message: str, **extra: Any) -> bytes:
    return _line({"v": VERSION, "ok": False, "error": {"code": code, "message": message, **extra}})


def error_from(exc: ProtocolError) -> bytes:
    return error(exc.code, exc.message, **exc.extra)


@dataclass(frozen=True)
class Response:
    ok: bool
    result: dict[str, Any]
    error_code: str | None = None
    error_message: str | None = None
    error: dict[str, Any] = field(default_factory=dict)


def decode_response(line: bytes) -> Response:
    """An answer line -> Response; a malformed answer is a ProtocolError (agent's bug)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digits
        raise ProtocolError("bad_request", "the agent's answer is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ProtocolError("bad_request", "the agent's answer has no 'ok' field")
    if data.get("v") != VERSION:
        raise ProtocolError(
            "unsupported_version", f"the agent speaks protocol {data.get('v')!r}, we speak 1"
        )
    if data["ok"]:
        result = data.get("result")
        return Response(True, result if isinstance(result, dict) else {})
    err = data.get("error")
    err = err if isinstance(err, dict) else {}
    return Response(False, {}, str(err.get("code", "internal")), str(err.get("message", "")), err)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"

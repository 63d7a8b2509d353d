"""JSON from someone we do not trust (a control-socket line, a state file), bounded.

``json.loads`` alone lets three kinds of input escape as exceptions no caller
expects (issue 15: each stopped the agent with exit 70): a number of 5,000
digits (``ValueError`` from int's digit limit), nesting 30,000 deep
(``RecursionError``), and bytes that are not UTF-8. Here every input either
parses within the bounds or raises :class:`JsonRejected` with one line that
says why. Duplicate keys are rejected too (the config loader does the same):
``{"op":"status","op":"reload"}`` must not mean whichever came last.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["DuplicateKey", "JsonRejected", "loads", "no_duplicate_keys"]

MAX_NUMBER_CHARS = 32  # a 64-bit integer has 20 digits; no field of ours needs more

# The characters that decide nesting: a quote, a backslash escape, a bracket.
# Scanning only these is linear (no backtracking) and skips everything else.
_TOKENS = re.compile(rb'["\[\]{}]|\\.', re.DOTALL)


class JsonRejected(ValueError):
    """The input is not JSON within our bounds; the message says why (one line)."""


class DuplicateKey(JsonRejected):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key[:40]!r}")
        self.key = key


def _depth_within(raw: bytes, max_depth: int) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return True  # cannot nest deeper than it has brackets
    depth = 0
    in_string = False
    for m in _TOKENS.finditer(raw):
        tok = m.group()
        if tok == b'"':
            in_string = not in_string
        elif in_string or tok[:1] == b"\\":
            continue
        elif tok in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return False
        else:
            depth -= 1
    return True


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object_pairs_hook that refuses a key given twice."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return out


def _number(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        if len(text) > MAX_NUMBER_CHARS:
            raise JsonRejected(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
        return kind(text)

    return parse


def _constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not a JSON number")


_parse_int = _number(int)
_parse_float = _number(float)


def loads(raw: bytes, *, max_depth: int) -> Any:
    """``raw`` as JSON, nested at most ``max_depth`` deep; else JsonRejected."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRejected(f"not UTF-8 (byte {exc.start})") from None
    if not _depth_within(raw, max_depth):
        raise JsonRejected(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(
            text,
            object_pairs_hook=no_duplicate_keys,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_constant,
        )
    except json.JSONDecodeError as exc:
        raise JsonRejected(f"not JSON: {exc.msg} (character {exc.pos})") from None
    except RecursionError:  # not reached within max_depth; kept so nothing else escapes
        raise JsonRejected("nested too deeply") from None

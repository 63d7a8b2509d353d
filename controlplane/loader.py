"""Read a config file (YAML or JSON, or ``-`` for stdin) into a :class:`Config`,
or explain why not.

Every problem is reported with its field path (``flowtables[0].devices[2]``)
and the line it comes from. Nothing here touches the kernel.

The text is read once, bounded in size, and parsed by libyaml's event stream
(PyYAML's C parser). We compose the data from those events ourselves rather
than use PyYAML's composer and constructors because:

- PyYAML's constructors implement YAML 1.1 (``1:20`` is 80, ``on`` is True,
  ``010`` is 8); scalars here resolve by the YAML 1.2 core schema only;
- its C composer recurses in C without a depth check (a deeply nested file
  crashes the process) and expands aliases without a bound;
- it keeps the last of two equal keys; here a duplicate key is an error;
- one pass gives both the data and the line of every key and item.
"""

from __future__ import annotations

import json
import math
import re
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from controlplane.boundedjson import DuplicateKey, no_duplicate_keys
from controlplane.errors import ConfigError, ConfigIssue, UnreadableConfig

if TYPE_CHECKING:
    from pydantic import ValidationError

    from controlplane.config import Config, Loc

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_VALUES",
    "format_loc",
    "load_bytes",
    "load_config",
    "load_text",
    "parse_config",
]

# A 1,000-rule config is ~100 KB and ~11,000 values; these leave a wide
# margin while keeping a hostile input from costing more than a second.
MAX_BYTES = 4 << 20
MAX_DEPTH = 64
MAX_VALUES = 250_000  # after alias expansion
MAX_ISSUES = 50  # reported; a bad alias can multiply one mistake

STDIN = "-"
FILE = "(file)"


def format_loc(loc: Loc) -> str:
    """``("flowtables", 0, "devices", 2)`` → ``flowtables[0].devices[2]``."""
    from controlplane.config import format_loc as fmt

    return fmt(loc)


# ---------------------------------------------------------------------------
# Where each value was written


class _Lines:
    """Line numbers of one mapping or sequence: ``entries`` maps a key (or an
    index) to its line and, for a nested mapping or sequence, its own _Lines."""

    __slots__ = ("entries", "line")

    def __init__(self, line: int) -> None:
        self.line = line
        self.entries: dict[str | int, tuple[int, _Lines | None]] = {}

    def find(self, loc: Loc) -> int:
        """The line of the deepest part of ``loc`` that exists (a missing key
        points at the mapping that lacks it)."""
        node: _Lines | None = self
        best = self.line
        for part in loc:
            if node is None or part not in node.entries:
                break
            best, node = node.entries[part]
        return best


# ---------------------------------------------------------------------------
# YAML: libyaml events → data, YAML 1.2 core schema


class _YamlProblem(Exception):
    def __init__(self, line: int | None, message: str, path: str = FILE) -> None:
        super().__init__(message)
        self.line, self.message, self.path = line, message, path


_INT = re.compile(r"[-+]?[0-9]+")
_INT_OCT = re.compile(r"0o[0-7]+")
_INT_HEX = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(inf|Inf|INF)")
_NAN = re.compile(r"\.(nan|NaN|NAN)")
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}

_TAG = "tag:yaml.org,2002:"


def _core_scalar(value: str) -> Any:
    """A plain scalar resolved by the YAML 1.2 core schema (everything else is a string)."""
    if value in _NULLS:
        return None
    if value in _BOOLS:
        return _BOOLS[value]
    c = value[0]
    if c.isdigit() or c in "+-.":
        if _INT.fullmatch(value):
            return int(value)
        if _INT_OCT.fullmatch(value):
            return int(value[2:], 8)
        if _INT_HEX.fullmatch(value):
            return int(value[2:], 16)
        if _FLOAT.fullmatch(value):
            return float(value)
        if _INF.fullmatch(value):
            return -math.inf if c == "-" else math.inf
        if _NAN.fullmatch(value):
            return math.nan
    return value


def _tagged_scalar(tag: str, value: str, line: int) -> Any:
    if tag in ("!", _TAG + "str"):
        return value
    kind = tag.removeprefix(_TAG)
    resolved = _core_scalar(value)
    expected = {"int": int, "float": float, "bool": bool, "null": type(None)}.get(kind)
    if expected is None:
        raise _YamlProblem(line, f"unsupported tag {tag!r} (plain YAML values only)")
    if expected is float and type(resolved) is int:
        return float(resolved)
    if type(resolved) is not expected:
        raise _YamlProblem(line, f"{value!r} is not a valid !!{kind}")
    return resolved


def _yaml_events(text: str) -> Any:
    try:
        from yaml._yaml import CParser  # libyaml
    except ImportError:  # PyYAML built without libyaml: same events, ~10x slower
        import yaml

        return yaml.parse(text, Loader=yaml.SafeLoader)
    parser = CParser(text)

    def events() -> Any:
        try:
            while parser.check_event():
                yield parser.get_event()
        finally:
            parser.dispose()

    return events()


def _compose_yaml(text: str) -> tuple[Any, _Lines | None]:
    """Data and line numbers from one pass over libyaml's events.

    Iterative (an explicit stack), so nesting depth is checked rather than
    overflowing the C or Python stack; aliases reuse the anchored value and
    count its size against MAX_VALUES, so they cannot expand without bound.
    libyaml >= 0.2.6 scans a flow collection ahead and may refuse 1,000 levels
    first, in its own words: that is one "invalid YAML" problem with its line.
    """
    from yaml import events as ev

    Scalar, Alias = ev.ScalarEvent, ev.AliasEvent
    MapStart, SeqStart = ev.MappingStartEvent, ev.SequenceStartEvent
    MapEnd, SeqEnd = ev.MappingEndEvent, ev.SequenceEndEvent
    DocStart = ev.DocumentStartEvent

    # Each open collection: [container, lines, pending key (mappings), key line,
    # anchor, values count at its start]
    stack: list[list[Any]] = []
    anchors: dict[str, tuple[Any, _Lines | None, int]] = {}
    values = 0
    docs = 0
    root: tuple[Any, _Lines | None] = (None, None)

    def path_of(extra: str | int | None = None) -> str:
        from controlplane.config import format_loc as fmt

        # each enclosing collection's pending key (or next index) leads to the next
        parts: list[str | int] = [f[2] if isinstance(f[0], dict) else len(f[0]) for f in stack[:-1]]
        if extra is not None:
            parts.append(extra)
        return fmt(tuple(parts))

    def add(value: Any, lines: _Lines | None, line: int) -> None:
        nonlocal root
        if not stack:
            root = (value, lines)
            return
        frame = stack[-1]
        container = frame[0]
        if isinstance(container, list):
            container.append(value)
            frame[1].entries[len(container) - 1] = (line, lines)
        elif frame[2] is _NO_KEY:
            if not isinstance(value, str):
                shown = (
                    "a mapping"
                    if isinstance(value, dict)
                    else ("a sequence" if isinstance(value, list) else f"{value!r}")
                )
                raise _YamlProblem(line, f"keys must be strings (got {shown})", path_of())
            if value in container:
                first = frame[1].entries[value][0]
                raise _YamlProblem(
                    line, f"duplicate key {value!r} (first at line {first})", path_of(value)
                )
            frame[2], frame[3] = value, line
        else:
            key = frame[2]
            container[key] = value
            frame[1].entries[key] = (frame[3], lines)
            frame[2] = _NO_KEY

    for event in _yaml_events(text):
        cls = type(event)
        if cls is Scalar:
            line = event.start_mark.line + 1
            values += 1
            if event.tag is None:
                # style '' or None: plain; quoted scalars are always strings
                value = _core_scalar(event.value) if not event.style else event.value
            else:
                value = _tagged_scalar(event.tag, event.value, line)
            if event.anchor is not None:
                anchors[event.anchor] = (value, None, 1)
            add(value, None, line)
        elif cls is MapStart or cls is SeqStart:
            line = event.start_mark.line + 1
            if event.tag is not None and event.tag not in (
                "!",
                _TAG + ("map" if cls is MapStart else "seq"),
            ):
                raise _YamlProblem(line, f"unsupported tag {event.tag!r} (plain YAML values only)")
            if len(stack) >= MAX_DEPTH:
                raise _YamlProblem(line, f"nested deeper than {MAX_DEPTH} levels")
            values += 1
            container: Any = {} if cls is MapStart else []
            stack.append([container, _Lines(line), _NO_KEY, 0, event.anchor, values])
        elif cls is MapEnd or cls is SeqEnd:
            container, lines, _, _, anchor, start = stack.pop()
            if anchor is not None:
                anchors[anchor] = (container, lines, values - start + 1)
            add(container, lines, lines.line)
        elif cls is Alias:
            line = event.start_mark.line + 1
            if event.anchor not in anchors:
                raise _YamlProblem(line, f"unknown alias *{event.anchor} (anchors must come first)")
            value, lines, size = anchors[event.anchor]
            values += size
            add(value, lines, line)
        elif cls is DocStart:
            docs += 1
            if docs > 1:
                raise _YamlProblem(
                    event.start_mark.line + 1, "more than one YAML document ('---'); use one"
                )
        if values > MAX_VALUES:
            raise _YamlProblem(
                None,
                f"more than {MAX_VALUES:,} values (after expanding aliases); refusing to read on",
            )
    return root


class _NoKey:
    __slots__ = ()


_NO_KEY: Any = _NoKey()


# ---------------------------------------------------------------------------
# JSON


def _json_lines(text: str) -> _Lines | None:
    """Line numbers for a JSON text, only needed when reporting a problem.

    JSON is YAML 1.2, so the YAML composer finds them (and the path and line
    of a duplicate key); best effort: None if the text is beyond it (not a bug
    of ours: that is raised)."""
    try:
        return _compose_yaml(text)[1]
    except Exception as exc:
        if isinstance(exc, _YamlProblem) or _parser_issue(exc) is not None:
            return None
        raise


def _json_depth_ok(data: Any) -> None:
    """The same nesting bound as for YAML (json.loads itself allows ~1,000)."""
    todo: list[tuple[Any, int]] = [(data, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise _YamlProblem(None, f"nested deeper than {MAX_DEPTH} levels")
            items = value.values() if isinstance(value, dict) else value
            todo.extend((v, depth + 1) for v in items)


def _load_json(text: str) -> tuple[Any, _Lines | None]:
    try:
        data = json.loads(text, object_pairs_hook=no_duplicate_keys)
        _json_depth_ok(data)
        return data, None
    except json.JSONDecodeError as exc:
        raise _YamlProblem(exc.lineno, f"invalid JSON: {exc.msg}") from None
    except DuplicateKey as exc:
        try:
            _compose_yaml(text)
        except _YamlProblem as found:
            if found.message.startswith("duplicate key"):
                raise
        raise _YamlProblem(None, f"duplicate key {exc.key!r}") from None


# ---------------------------------------------------------------------------
# Validation


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


LinesSource = _Lines | Callable[[], _Lines | None] | None


def _issues_from(exc: ValidationError, source: LinesSource) -> list[ConfigIssue]:
    from controlplane.config import FieldErrors
    from controlplane.config import format_loc as fmt

    lines = source() if callable(source) else source

    def line(loc: Loc) -> int | None:
        return lines.find(loc) if lines is not None else None

    issues: list[ConfigIssue] = []
    for err in exc.errors(include_url=False):
        loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, FieldErrors):
            for sub, msg in ctx_err.issues:
                full = (*loc, *sub)
                issues.append(ConfigIssue(fmt(full), msg, line(full)))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see 'offloadctl schema')"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"].endswith("_type") and "input" in err:
            msg = f"{msg} (got {type(err['input']).__name__} {_short(err['input'])})"
        issues.append(ConfigIssue(fmt(loc), msg, line(loc)))
    return issues


def parse_config(data: Any, lines: LinesSource = None, source: str | None = None) -> Config:
    """Validate already-parsed data (``lines``: where each field was written,
    or a function computing that only if there is a problem to report)."""
    from pydantic import ValidationError

    from controlplane.config import Config

    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("(top level)", "the config must be a mapping with 'version: 1'")], source
        )
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        issues = _issues_from(exc, lines)
        if len(issues) > MAX_ISSUES:
            more = len(issues) - MAX_ISSUES
            issues = [*issues[:MAX_ISSUES], ConfigIssue("...", f"{more} more problem(s)")]
        raise ConfigError(issues, source) from None
    if lines is not None:
        _WRITTEN_AT[id(cfg)] = lines
        weakref.finalize(cfg, _WRITTEN_AT.pop, id(cfg), None)
    return cfg


# Where each parsed config's fields were written, kept for checks that run after
# parsing (an interface the namespace lacks: core/preflight.py names its line).
_WRITTEN_AT: dict[int, LinesSource] = {}


def line_of(cfg: Config, loc: Loc) -> int | None:
    """The line ``loc`` (e.g. ``("nat", "masquerade", 0, "oifname")``) of ``cfg``
    was written on; None for a config built in code."""
    source = _WRITTEN_AT.get(id(cfg))
    lines = source() if callable(source) else source
    return lines.find(loc) if lines is not None else None


def load_text(text: str, source: str | None = None, *, json_syntax: bool = False) -> Config:
    """Parse and validate a config's text (YAML unless ``json_syntax``)."""
    try:
        if json_syntax:
            data, lines = _load_json(text)
        else:
            data, lines = _compose_yaml(text)
    except _YamlProblem as exc:
        raise ConfigError([ConfigIssue(exc.path, exc.message, exc.line)], source) from None
    except Exception as exc:
        issue = _parser_issue(exc)
        if issue is None:  # not the input's fault but ours: exit 70 (cli/errors.py)
            raise
        raise ConfigError([issue], source) from None
    return parse_config(data, (lambda: _json_lines(text)) if json_syntax else lines, source)


def _parser_issue(exc: BaseException) -> ConfigIssue | None:
    """What a parser's failure says about the input, in one line; None when it
    says nothing about the input (a bug of ours, which must not be blamed on
    the config)."""
    yaml = sys.modules.get("yaml")  # loaded if the YAML parser ran
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        return ConfigIssue(FILE, f"invalid YAML: {problem}", line)
    if isinstance(exc, RecursionError):  # json.loads of a deeply nested text
        return ConfigIssue(FILE, "nested too deeply")
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return ConfigIssue(FILE, "a number longer than 4,300 digits")
    return None


def _read(stream: BinaryIO, source: str) -> str:
    return _decode(stream.read(MAX_BYTES + 1), source)


def _decode(raw: bytes, source: str) -> str:
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            [ConfigIssue(FILE, f"larger than {MAX_BYTES >> 20} MiB; a config is far smaller")],
            source,
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(FILE, f"not UTF-8 text (byte {exc.start}: {exc.reason})")], source
        ) from None
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        raise ConfigError(
            [
                ConfigIssue(
                    FILE,
                    f"control character U+{ord(bad.group()):04X} at column {column};"
                    " a config is plain text",
                    line,
                )
            ],
            source,
        )
    return text


# What neither YAML nor JSON allows anywhere in a document (C0 controls but tab,
# LF and CR; DEL; C1 controls but NEL; lone surrogates): found here, it is one
# line naming where, not a parser's two-line message without a line number.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff]")


def load_config(path: str | Path) -> Config:
    """Load ``path`` (``-``: stdin, YAML or JSON): JSON if it ends in .json.
    Only a regular file is read: a FIFO, socket or device is refused, never
    waited on."""
    from controlplane.regular_file import read_regular

    if str(path) == STDIN:
        return load_text(_read(sys.stdin.buffer, "<stdin>"), "<stdin>")
    path = Path(path)
    source = str(path)
    try:
        raw = read_regular(path, MAX_BYTES)
    except FileNotFoundError:
        raise UnreadableConfig(source, "no such file") from None
    except PermissionError:
        raise UnreadableConfig(source, "permission denied") from None
    except OSError as exc:
        raise UnreadableConfig(source, f"cannot read: {exc.strerror or exc}") from None
    return load_bytes(raw, source, json_syntax=path.suffix == ".json")


def load_bytes(raw: bytes, source: str, *, json_syntax: bool = False) -> Config:
    """A config file's bytes (bounded, UTF-8, plain text) → Config, or ConfigError."""
    return load_text(_decode(raw, source), source, json_syntax=json_syntax)

"""One log format for the agent and ``offloadctl watch``: logfmt, or JSON lines.

A line is ``ts=… level=… event=… msg="…" key=value…`` (logfmt, as Prometheus,
Loki and Grafana tooling read it): keys are unique, values with spaces, quotes
or ``=`` are quoted, lists are comma-joined, devices are named (their ifindex
is an extra ``*_ifindex`` field). ``ts`` is RFC 3339 UTC with milliseconds,
left out when journald is the sink (``JOURNAL_STREAM`` names our stderr):
the journal stamps each line itself. JSON lines carry the same keys, ``ts``
always.

Built on the standard ``logging`` module (levels, handlers, thread safety);
what is ours is the line format (:func:`logfmt`, :func:`json_line`). Expected
conditions (a bad config, a refused transaction) are one line with the reason,
never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Literal

from controlplane.core.numbers import ascii_decimal
from controlplane.errors import one_line

LogFormat = Literal["plain", "json"]
LOGGER_NAME = "offloadctl.agent"
# Keys every line starts with, in this order; a field of the same name is not
# repeated (it would be a duplicate key).
HEAD = ("ts", "level", "event", "msg")


def rfc3339(created: float) -> str:
    """``2026-12-08T00:30:00.123Z``."""
    whole = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + (
        f".{int((created - whole) * 1000):03d}Z"
    )


def journald_is_sink(stream: IO[str] | None = None) -> bool:
    """True when systemd connected ``stream`` (default stderr) to the journal:
    ``JOURNAL_STREAM`` is ``DEV:INODE`` of that very stream (systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or ascii_decimal(dev) is None or ascii_decimal(ino) is None:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # a StringIO in tests: not the journal
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | set | frozenset):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, float):
        value = f"{value:g}" if abs(value) < 1e15 else str(value)
    text = "" if value is None else str(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return json.dumps(text)  # quoted, with \n \" escaped: still one line


def _ordered(record: Mapping[str, Any]) -> dict[str, Any]:
    head = {k: record[k] for k in HEAD if k in record}
    return head | {k: v for k, v in record.items() if k not in head}


def logfmt(record: Mapping[str, Any]) -> str:
    """One logfmt line (no newline) of ``record``; the HEAD keys first."""
    return " ".join(f"{k}={_value(v)}" for k, v in _ordered(record).items())


def json_line(record: Mapping[str, Any]) -> str:
    """One JSON object (no newline), the HEAD keys first."""
    return json.dumps(_ordered(record), default=str, separators=(",", ":"))


def line(record: Mapping[str, Any], fmt: LogFormat, created: float, stamp: bool = True) -> str:
    """``record`` as one line of ``fmt``, stamped with ``ts`` (plain: unless ``stamp``
    is False, i.e. journald stamps it)."""
    if fmt == "json":
        return json_line({"ts": rfc3339(created), **record})
    return logfmt({"ts": rfc3339(created), **record} if stamp else dict(record))


class LineFormatter(logging.Formatter):
    def __init__(self, fmt: LogFormat, stamp: bool) -> None:
        super().__init__()
        self._fmt_name: LogFormat = fmt
        self._stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if self._fmt_name == "plain":  # one line per decision, even for a multi-line message
            msg = one_line(msg)
        doc: dict[str, Any] = {
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "-"),
            "msg": msg,
        }
        for k, v in getattr(record, "fields", {}).items():
            doc.setdefault(k, v)
        return line(doc, self._fmt_name, record.created, self._stamp)


def setup(fmt: LogFormat = "plain", stream: IO[str] | None = None) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(LineFormatter(fmt, stamp=not journald_is_sink(out)))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class DecisionLog:
    """``log.info("reload", "applied 3 changes", source="sighup", ms=12)``."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger(LOGGER_NAME)

    def _emit(self, level: int, event: str, message: str, fields: dict[str, Any]) -> None:
        self._log.log(level, "%s", message, extra={"event": event, "fields": fields})

    def info(self, event: str, message: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, message, fields)

    def warning(self, event: str, message: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, message, fields)

    def error(self, event: str, message: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, message, fields)

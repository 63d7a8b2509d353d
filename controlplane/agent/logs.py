"""The agent's log: one line per decision on stderr, plain text or JSON.

Built on the standard ``logging`` module (levels, handlers, thread safety come
for free); what is ours is the line format. Each record carries an ``event``
(what was decided: ``apply``, ``reload``, ``control``...) and flat ``fields``
that the JSON form emits as keys, so a log pipeline can filter without parsing
prose. Expected conditions (a bad config, a refused transaction) are logged as
one line with the reason, never with a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Literal

LogFormat = Literal["plain", "json"]
LOGGER_NAME = "offloadctl.agent"


def _utc(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        event = getattr(record, "event", "-")
        extra = " ".join(f"{k}={_plain(v)}" for k, v in fields.items())
        # One line per decision, even for a message that spans lines.
        msg = "; ".join(part.strip() for part in record.getMessage().splitlines() if part.strip())
        line = f"{_utc(record.created)} {record.levelname.lower()} {event}: {msg}"
        return f"{line} [{extra}]" if extra else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None),
            "msg": record.getMessage(),
        }
        for k, v in getattr(record, "fields", {}).items():
            doc.setdefault(k, v)
        return json.dumps(doc, default=str, separators=(",", ":"))


def _plain(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() for c in text)) else text


def setup(fmt: LogFormat = "plain", stream: IO[str] | None = None) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
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

"""Read a config file (YAML or JSON) into a :class:`Config`, or explain why not.

Every problem is reported with its field path (``flowtables[0].devices[2]``)
and, for YAML, the line it comes from. Nothing here touches the kernel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controlplane.config import Config, FieldErrors, Loc, format_loc
from controlplane.errors import ConfigError, ConfigIssue

__all__ = ["format_loc", "load_config", "parse_config"]


class _LineFinder:
    """Maps a field path to the YAML line it was written on."""

    def __init__(self, node: yaml.Node | None) -> None:
        self.root = node

    def line(self, loc: Loc) -> int | None:
        node = self.root
        best = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
                if nxt is None:
                    # unknown key: point at the key itself when it exists
                    return best
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    return best
                node = node.value[part]
            else:
                return best
            best = node.start_mark.line + 1
        return best


def _issues_from(exc: ValidationError, finder: _LineFinder | None) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for err in exc.errors(include_url=False):
        loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, FieldErrors):
            for sub, msg in ctx_err.issues:
                full = (*loc, *sub)
                issues.append(
                    ConfigIssue(format_loc(full), msg, finder.line(full) if finder else None)
                )
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see 'offloadctl schema')"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"].endswith("_type") and "input" in err:
            msg = f"{msg} (got {type(err['input']).__name__} {err['input']!r})"
        issues.append(ConfigIssue(format_loc(loc), msg, finder.line(loc) if finder else None))
    return issues


def parse_config(data: Any, finder: _LineFinder | None = None, source: str | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("(top level)", "the config must be a mapping with 'version: 1'")], source
        )
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues_from(exc, finder), source) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(source, "no such file")], source) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(source, f"cannot read: {exc}")], source) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                [ConfigIssue("(file)", f"invalid JSON: {exc.msg}", exc.lineno)], source
            ) from None
        return parse_config(data, None, source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [ConfigIssue("(file)", f"invalid YAML: {problem}", line)], source
        ) from None
    return parse_config(data, _LineFinder(node), source)

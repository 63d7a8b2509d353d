"""A typer-free parser for the commands that must start lean, from one
declaration of their parameters (a tuple of :class:`Param`).

``reuseport exec`` (a restart's start-up CPU competes with the server it
restarts: cli/exec_cmd.py) and ``agent`` (typer with click is ~5 MB of its RSS
budget: cli/agent_cmd.py) are parsed here first by ``offloadctl``'s main().
The parser takes only the plain spellings (``--opt VALUE``, ``--opt=VALUE``,
a short flag then its VALUE, decimal numbers in range); anything else
(``--help``, a usage error, ``-nweb``, ``1e3``, a value starting with '-')
returns None and main() runs the typer command instead, which prints click's
help and error lines. What this parser accepts, click parses the same (property
tests hold them together). The typer command is built from the same
declaration (:func:`typer_command`), so --help, the man page and completion
have one source.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["REQUIRED", "Param", "fast_main", "parse", "reported", "typer_command", "typer_param"]

REQUIRED: Any = ...  # typer's marker of a required parameter


@dataclass(frozen=True)
class Param:
    """One parameter of a command, as typer declares it."""

    dest: str  # the function argument (and click's name)
    flags: tuple[str, ...]  # every spelling; () for a positional
    kind: type  # str, Path, int, float or bool (a flag, or a --x/--no-x pair)
    help: str
    default: Any = REQUIRED
    multiple: bool = False  # repeatable option, or the positional's nargs=-1
    min: float | None = None
    show_default: bool = True
    envvar: str | None = None
    metavar: str | None = None

    @property
    def annotation(self) -> Any:
        if self.multiple:
            return list[self.kind]  # type: ignore[name-defined]
        return self.kind | None if self.default is None else self.kind


# --- the fast parser --------------------------------------------------------------

_DECIMAL = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")}


def _spellings(params: Sequence[Param]) -> dict[str, tuple[Param, Any]]:
    """Every flag -> (its parameter, the value a bare flag stands for, or None)."""
    out: dict[str, tuple[Param, Any]] = {}
    for p in params:
        for flag in p.flags:
            if p.kind is bool:
                on, _, off = flag.partition("/")
                out[on] = (p, True)
                if off:
                    out[off] = (p, False)
            else:
                out[flag] = (p, None)
    return out


def _value(p: Param, text: str) -> Any:
    """``text`` as ``p``'s value, or None where click's reading is left to click."""
    if p.kind is str:
        return None if text.startswith("-") else text
    if p.kind is Path:  # '' is Path('.') to click: left to it
        return None if text.startswith("-") or not text else Path(text)
    if not _DECIMAL[p.kind].fullmatch(text):
        return None
    value = p.kind(text)
    return None if p.min is not None and value < p.min else value


def parse(
    params: Sequence[Param], args: Sequence[str], interspersed: bool = True
) -> dict[str, Any] | None:
    """The parameters as the typer command would get them, or None: not a
    spelling this parser takes (let click parse it, answer or refuse it).

    One positional parameter at most: repeatable (``nargs=-1``) or a single
    value. Without ``interspersed``, the first positional word (or ``--``) ends
    the options and the rest is the positional's."""
    spellings = _spellings(params)
    values: dict[str, Any] = {p.dest: [] if p.multiple else p.default for p in params}
    positional = next((p for p in params if not p.flags), None)
    words: list[str] = []
    given: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--" or not arg.startswith("-") or arg == "-":
            if arg == "--" or not interspersed:
                words.extend(args[i:] if arg == "--" else args[i - 1 :])
                break
            words.append(arg)
            continue
        flag, eq, attached = arg.partition("=")
        if flag not in spellings or (eq and not flag.startswith("--")):
            return None
        p, bare = spellings[flag]
        if bare is not None:
            if eq:
                return None
            value: Any = bare
        else:
            if not eq:
                if i == len(args):
                    return None
                attached, i = args[i], i + 1
            value = _value(p, attached)
            if value is None:
                return None
        given.add(p.dest)
        if p.multiple:
            values[p.dest].append(value)
        else:
            values[p.dest] = value
    if words:
        if positional is None or (not positional.multiple and len(words) > 1):
            return None  # click names the extra argument
        if positional.multiple:
            values[positional.dest] = list(words)
        else:
            value = Path(words[0]) if positional.kind is Path else words[0]
            if value in ("", Path("")):
                return None
            values[positional.dest] = value
    for p in params:
        if p.envvar and p.dest not in given and os.environ.get(p.envvar):
            values[p.dest] = os.environ[p.envvar]
        if values[p.dest] is REQUIRED or (p.multiple and not values[p.dest]):
            return None  # click says what is missing
    return values


def fast_main(
    params: Sequence[Param],
    run: Callable[[Mapping[str, Any]], int | None],
    args: Sequence[str],
    interspersed: bool = True,
) -> int | None:
    """Run the command on ``args`` without typer: the exit status, or None when
    ``args`` are for click (help, a usage error, an odd spelling)."""
    values = parse(params, args, interspersed)
    if values is None:
        return None
    try:
        return run(values) or 0
    except SystemExit:
        raise
    except BaseException as exc:
        return reported(exc)


def reported(exc: BaseException) -> int:
    """Report ``exc`` as every command does (typer is imported only now, on failure)."""
    import typer

    from controlplane.cli.errors import handles_errors

    def reraise() -> NoReturn:
        raise exc

    try:
        handles_errors(reraise)()
    except typer.Exit as done:
        return int(done.exit_code)
    raise AssertionError("handles_errors returned")  # pragma: no cover


# --- the typer command, from the same declaration -------------------------------------


def typer_param(p: Param) -> Any:
    """The typer declaration of ``p``."""
    import typer

    if not p.flags:
        return typer.Argument(
            p.default, help=p.help, show_default=p.show_default, metavar=p.metavar
        )
    return typer.Option(
        p.default,
        *p.flags,
        help=p.help,
        min=p.min,
        show_default=p.show_default,
        envvar=p.envvar,
        metavar=p.metavar,
    )


def typer_command(
    params: Sequence[Param], doc: str, run: Callable[[Mapping[str, Any]], int | None]
) -> Callable[..., None]:
    """A typer command function with ``params``, ``doc`` as its help, that
    calls ``run`` (errors reported by cli/errors.py's ``handles_errors``)."""
    import typer

    from controlplane.cli.errors import handles_errors

    def command(**values: Any) -> None:
        code = run(values)
        if code:
            raise typer.Exit(code)

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(p.dest, inspect.Parameter.KEYWORD_ONLY, default=typer_param(p))
            for p in params
        ]
    )
    command.__annotations__ = {p.dest: p.annotation for p in params}
    command.__doc__ = doc
    return handles_errors(command)

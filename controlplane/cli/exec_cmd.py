"""``offloadctl reuseport exec``: its options, what it does with them, and the
start-up that reaches it without typer or pydantic.

A restart is a new ``exec`` process starting while the old generation serves:
its start-up CPU competes with the server and its clients, and typer with
pydantic costs ~300 ms of CPU per start against ~70 ms for what exec itself
imports. So ``offloadctl``'s main() hands the arguments after ``reuseport
exec`` to :func:`fast_main` first. Its parser takes only the plain spellings
(``--opt VALUE``, ``--opt=VALUE``, ``-n``/``-l VALUE``, decimal numbers in
range, then ``--`` or the first positional starts CMD); anything else
(``--help``, a usage error, ``-nweb``, ``1e3``, a value starting with '-')
returns None and main() runs the typer command instead, which prints click's
help and error lines. What the fast parser accepts, click parses the same
(a property test holds them together).

The options have one home, :data:`PARAMS`: the typer command is built from
it (cli/reuseport.py), and so are --help, the man page and completion. The
behaviour has one home too, :func:`run`, which both starts call.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from controlplane.errors import ConfigError, ConfigIssue
from controlplane.kernel.bpf.loader import DEFAULT_BPFFS

__all__ = ["BPFFS", "HELP", "NAME", "NETNS", "PARAMS", "Param", "fast_main", "parse", "run"]

REQUIRED: Any = ...  # typer's marker of a required parameter


@dataclass(frozen=True)
class Param:
    """One parameter of the command, as typer declares it."""

    dest: str  # the function argument (and click's name)
    flags: tuple[str, ...]  # every spelling; () for the positional CMD
    kind: type  # str, int, float or bool (a --x/--no-x flag)
    help: str
    default: Any = REQUIRED
    multiple: bool = False  # repeatable option, or the positional's nargs=-1
    min: float | None = None
    show_default: bool = True
    envvar: str | None = None

    @property
    def annotation(self) -> Any:
        if self.multiple:
            return list[self.kind]  # type: ignore[name-defined]
        return self.kind | None if self.default is None else self.kind


NAME = Param("name", ("--name", "-n"), str, "group name")
NETNS = Param(
    "netns",
    ("--netns",),
    str,
    "network namespace (default: the current one)",
    default=None,
    show_default=False,
)
BPFFS = Param(
    "bpffs", ("--bpffs",), str, "bpffs mount point", DEFAULT_BPFFS, envvar="OFFLOADCTL_BPFFS"
)
PARAMS: tuple[Param, ...] = (
    NAME,
    Param(
        "listen",
        ("--listen", "-l"),
        str,
        "[NAME=]ADDR:PORT, IPv6 as [ADDR]:PORT; repeatable",
        multiple=True,
    ),
    Param("cmd", (), str, "the server and its arguments, after '--'", multiple=True),
    Param(
        "ready_after",
        ("--ready-after",),
        float,
        "activate after this many seconds even without READY=1 (servers without sd_notify)",
        default=None,
        min=0,
        show_default=False,
    ),
    Param(
        "ready_timeout",
        ("--ready-timeout",),
        float,
        "give up a start that is not ready by then (the old one keeps serving)",
        90.0,
        min=0,
    ),
    Param("stop_signal", ("--stop-signal",), str, "signal that asks the old CMD to stop", "TERM"),
    Param(
        "stop_timeout",
        ("--stop-timeout",),
        float,
        "SIGKILL an old CMD still running this long after the stop signal",
        90.0,
        min=0,
    ),
    Param(
        "reload_signal",
        ("--reload-signal",),
        str,
        "on this signal (e.g. HUP from ExecReload=/bin/kill -HUP $MAINPID) fork the next"
        " generation: a restart that starts no new interpreter; not forwarded to CMD",
        default=None,
        show_default=False,
    ),
    Param("backlog", ("--backlog",), int, "listen() backlog", 4096, min=1),
    Param(
        "detach",
        ("--detach/--no-detach",),
        bool,
        "return once the new generation is active and leave it running (ExecReload=)",
        False,
    ),
    NETNS,
    BPFFS,
)
HELP = """Run CMD as the next generation of the group, with socket activation.

Opens the listeners, registers them as the group's next generation and
starts CMD with them (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES). When CMD
sends READY=1 to the NOTIFY_SOCKET it is given (or --ready-after passed),
the generation is activated and the previous 'exec' of the group retires
its listeners, so its queued connections migrate here, and stops its CMD.
Exits with CMD's status.
"""

# --- the fast parser --------------------------------------------------------------

_DECIMAL = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")}


def _spellings() -> dict[str, tuple[Param, Any]]:
    """Every flag -> (its parameter, the value a bare flag stands for, or None)."""
    out: dict[str, tuple[Param, Any]] = {}
    for p in PARAMS:
        for flag in p.flags:
            if p.kind is bool:
                on, off = flag.split("/")
                out[on], out[off] = (p, True), (p, False)
            else:
                out[flag] = (p, None)
    return out


def _value(p: Param, text: str) -> Any:
    """``text`` as ``p``'s value, or None where click's reading is left to click."""
    if p.kind is str:
        return None if text.startswith("-") else text
    if not _DECIMAL[p.kind].fullmatch(text):
        return None
    value = p.kind(text)
    return None if p.min is not None and value < p.min else value


def parse(args: Sequence[str]) -> dict[str, Any] | None:
    """The parameters as the typer command would get them, or None: not a
    spelling this parser takes (let click parse it, answer or refuse it)."""
    spellings = _spellings()
    values: dict[str, Any] = {p.dest: [] if p.multiple else p.default for p in PARAMS}
    given: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--" or not arg.startswith("-") or arg == "-":
            values["cmd"] = list(args[i:] if arg == "--" else args[i - 1 :])
            break
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
    for p in PARAMS:
        if p.envvar and p.dest not in given and os.environ.get(p.envvar):
            values[p.dest] = os.environ[p.envvar]
        if values[p.dest] is REQUIRED or (p.multiple and not values[p.dest]):
            return None  # click says what is missing (CMD is required too)
    return values


# --- what the command does ----------------------------------------------------------


def _signal_number(text: str, field: str = "--stop-signal") -> int:
    from controlplane.core.numbers import ascii_decimal

    name = text.upper()
    try:
        number = ascii_decimal(name)
        if number is not None:
            return int(signal.Signals(number))
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except (KeyError, ValueError):
        raise ConfigError(
            [ConfigIssue(field, f"{text!r} is not a signal name or number")]
        ) from None


def _reload_signal(text: str | None) -> int | None:
    from controlplane.agent.reuseport_exec import FORWARDED_SIGNALS
    from controlplane.core.reuseport_handover import STOP_SIGNALS

    if text is None:
        return None
    number = _signal_number(text, "--reload-signal")
    allowed = [s for s in FORWARDED_SIGNALS if s not in STOP_SIGNALS]
    if number not in allowed:
        names = ", ".join(signal.Signals(s).name[3:] for s in allowed)
        raise ConfigError(
            [
                ConfigIssue(
                    "--reload-signal", f"{text!r} cannot be the reload signal; one of {names}"
                )
            ]
        )
    return number


def run(values: Mapping[str, Any]) -> int:
    """Run the command with its parsed parameters; returns the exit status.
    Errors are raised, for cli/errors.py's ``handles_errors`` to report."""
    from controlplane import cli
    from controlplane.agent import reuseport_exec
    from controlplane.core.socket_activation import ListenSpec

    if cli.plugins_off_by_us:  # offloadctl's own setting (cli.main), not CMD's
        os.environ.pop("PYDANTIC_DISABLE_PLUGINS", None)
    opts = reuseport_exec.ExecOptions(
        name=values["name"],
        listens=tuple(ListenSpec.parse(text) for text in values["listen"]),
        argv=tuple(values["cmd"]),
        netns=values["netns"],
        bpffs=values["bpffs"],
        backlog=values["backlog"],
        ready_after=values["ready_after"],
        ready_timeout=values["ready_timeout"],
        stop_signal=_signal_number(values["stop_signal"]),
        stop_timeout=values["stop_timeout"],
        reload_signal=_reload_signal(values["reload_signal"]),
    )
    if values["detach"]:
        generation, code = reuseport_exec.run_detached(opts)
        if generation:
            print(f"generation {generation} of group {opts.name!r} active", flush=True)
        return code
    return reuseport_exec.run(opts)


def fast_main(args: Sequence[str]) -> int | None:
    """``offloadctl reuseport exec ARGS`` without typer: the exit status, or
    None when ``args`` are for click (help, a usage error, an odd spelling)."""
    values = parse(args)
    if values is None:
        return None
    try:
        return run(values)
    except SystemExit:
        raise
    except BaseException as exc:
        return _reported(exc)


def _reported(exc: BaseException) -> int:
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

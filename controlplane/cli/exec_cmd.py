"""``offloadctl reuseport exec``: its options, what it does with them, and the
start-up that reaches it without typer or pydantic.

A restart is a new ``exec`` process starting while the old generation serves:
its start-up CPU competes with the server and its clients, and typer with
pydantic costs ~300 ms of CPU per start against ~70 ms for what exec itself
imports. So ``offloadctl``'s main() hands the arguments after ``reuseport
exec`` to :func:`fast_main` first: cli/fastparse.py's parser, with ``--`` or
the first positional starting CMD; what it leaves to click (``--help``, a
usage error, ``-nweb``) runs the typer command instead.

The options have one home, :data:`PARAMS`: the typer command is built from
it (cli/reuseport.py), and so are --help, the man page and completion. The
behaviour has one home too, :func:`run`, which both starts call.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from controlplane.cli import fastparse
from controlplane.cli.fastparse import Param
from controlplane.errors import ConfigError, ConfigIssue
from controlplane.kernel.bpf.loader import DEFAULT_BPFFS

__all__ = ["BPFFS", "HELP", "NAME", "NETNS", "PARAMS", "Param", "fast_main", "parse", "run"]

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


def parse(args: Sequence[str]) -> dict[str, Any] | None:
    """The parameters as the typer command would get them, or None (for click):
    the options end at CMD's first word."""
    return fastparse.parse(PARAMS, args, interspersed=False)


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
    return fastparse.fast_main(PARAMS, run, args, interspersed=False)

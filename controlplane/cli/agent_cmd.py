"""``offloadctl agent``: its options, what it does with them, and the start-up
that reaches it without typer or click.

typer with its click is ~5 MB of RSS that a daemon holds for its whole life
and never uses after parsing (the goal is <= 64 MB at 100,000 indexed flows:
docs/agent.md, *Memory*). So ``offloadctl``'s main() hands the arguments after
``agent`` to :func:`fast_main` first (cli/fastparse.py's parser); what it
leaves to click (``--help``, a usage error, ``-1`` as an interval) runs the
typer command (cli/agent.py) instead, built from the same :data:`PARAMS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from controlplane.agent.health import STALE_AFTER
from controlplane.cli import fastparse
from controlplane.cli.fastparse import Param

__all__ = ["HELP", "PARAMS", "SOCKET", "fast_main", "parse", "run"]

SOCKET = Param(
    "socket_path",
    ("--socket",),
    Path,
    "control socket (default /run/offloadctl/<netns or host>.sock)",
    default=None,
    show_default=False,
    metavar="PATH",
)
PARAMS: tuple[Param, ...] = (
    Param(
        "config",
        (),
        Path,
        "config file (YAML or JSON; - reads stdin)",
        show_default=False,
        metavar="CONFIG",
    ),
    Param(
        "netns",
        ("--netns",),
        str,
        "network namespace name (ip netns)",
        default=None,
        show_default=False,
        metavar="NS",
    ),
    Param(
        "state_file",
        ("--state-file",),
        Path,
        "state file (default /var/lib/offloadctl/<netns or host>/state.json)",
        default=None,
        show_default=False,
        metavar="PATH",
    ),
    SOCKET,
    Param(
        "log_format",
        ("--log-format",),
        str,
        "plain (logfmt) or json",
        "plain",
        metavar="plain|json",
    ),
    Param(
        "metrics",
        ("--metrics",),
        str,
        "serve Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9108",
        default=None,
        show_default=False,
        metavar="HOST:PORT",
    ),
    Param(
        "metrics_allow_remote",
        ("--metrics-allow-remote",),
        bool,
        "allow a non-loopback --metrics address",
        False,
    ),
    Param(
        "cleanup_on_exit",
        ("--cleanup-on-exit",),
        bool,
        "on SIGTERM remove the table and reuseport groups we own",
        False,
    ),
    Param(
        "watch_interval",
        ("--watch-interval",),
        float,
        "seconds between config-file checks (0: only SIGHUP/reload)",
        1.0,
        metavar="SECONDS",
    ),
    Param(
        "drift_interval",
        ("--drift-interval",),
        float,
        "seconds between drift checks: a change another writer made to the"
        " table is undone within this (0: never)",
        10.0,
        metavar="SECONDS",
    ),
    Param(
        "health_stale_after",
        ("--health-stale-after",),
        float,
        "--metrics' /healthz fails once the main loop has not run for this long",
        STALE_AFTER,
        metavar="SECONDS",
    ),
)
HELP = "Apply CONFIG and keep the kernel in line with it until SIGTERM (reload: SIGHUP)."


def parse(args: Sequence[str]) -> dict[str, Any] | None:
    """The parameters as the typer command would get them, or None (for click)."""
    return fastparse.parse(PARAMS, args)


def run(values: Mapping[str, Any]) -> None:
    """Run the agent with its parsed parameters until SIGTERM. Errors are
    raised, for cli/errors.py's ``handles_errors`` to report."""
    from controlplane import __version__
    from controlplane.agent import daemon, logs
    from controlplane.errors import ConfigError, ConfigIssue, one_line
    from controlplane.kernel.netns import entered, require_root
    from controlplane.service.applier import KernelApplier
    from controlplane.service.kernel_view import KernelObserver

    netns, log_format = values["netns"], values["log_format"]
    if log_format not in ("plain", "json"):
        raise ConfigError([ConfigIssue("--log-format", f"{log_format!r}: use plain or json")])
    for flag in ("--watch-interval", "--drift-interval"):
        if values[flag[2:].replace("-", "_")] < 0:
            raise ConfigError([ConfigIssue(flag, "must be >= 0")])
    if values["health_stale_after"] <= 0:
        raise ConfigError([ConfigIssue("--health-stale-after", "must be > 0")])
    listen = None
    if values["metrics"] is not None:
        from controlplane.agent.metrics import parse_listen

        listen = parse_listen(values["metrics"], values["metrics_allow_remote"])
    require_root("running the agent")
    # The name becomes part of the default socket and state paths: refuse a bad
    # or missing namespace before any directory is made for it.
    with entered(netns):
        pass
    log = logs.DecisionLog(logs.setup("json" if log_format == "json" else "plain"))
    opts = daemon.AgentOptions(
        config_path=values["config"],
        netns=netns,
        state_path=values["state_file"],
        socket_path=values["socket_path"],
        cleanup_on_exit=values["cleanup_on_exit"],
        watch_interval=values["watch_interval"],
        drift_interval=values["drift_interval"],
        metrics=listen,
        health_stale_after=values["health_stale_after"],
    )
    from controlplane.agent.invalidation import InvalidationSubsystem

    def subsystems(a: daemon.Agent) -> tuple[InvalidationSubsystem, ...]:
        return (InvalidationSubsystem(netns, log, on_links=a.topology_changed),)

    try:
        daemon.run(
            opts,
            KernelApplier(),
            KernelObserver(),
            log,
            version=__version__,
            make_subsystems=subsystems,
        )
    except Exception as exc:
        # Also on the agent's own log stream, so a journal/JSON pipeline sees why it stopped.
        log.error("start", f"cannot run: {one_line(exc)}")
        raise


def fast_main(args: Sequence[str]) -> int | None:
    """``offloadctl agent ARGS`` without typer: the exit status, or None when
    ``args`` are for click (help, a usage error, an odd spelling)."""
    return fastparse.fast_main(PARAMS, run, args)

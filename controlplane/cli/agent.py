"""``offloadctl agent`` (the host daemon) and ``offloadctl reload`` (its client).

``agent_status`` and ``agent_answer`` let ``offloadctl status`` / ``flows`` answer
from a running agent (None/False when none runs in that namespace: then the
caller reads the kernel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.agent.health import STALE_AFTER
from controlplane.cli.common import ConfigArg, JsonOpt, NetnsOpt, app
from controlplane.cli.errors import err, handles_errors
from controlplane.errors import EnvironmentProblem, ExitCode, one_line

SocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        help="control socket (default /run/offloadctl/<netns or host>.sock)",
        show_default=False,
        metavar="PATH",
    ),
]


@app.command()
@handles_errors
def agent(
    config: ConfigArg,
    netns: NetnsOpt = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            help="state file (default /var/lib/offloadctl/<netns or host>/state.json)",
            show_default=False,
            metavar="PATH",
        ),
    ] = None,
    socket_path: SocketOpt = None,
    log_format: Annotated[
        str, typer.Option(help="plain (logfmt) or json", metavar="plain|json")
    ] = "plain",
    metrics: Annotated[
        str | None,
        typer.Option(
            help="serve Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9108",
            show_default=False,
            metavar="HOST:PORT",
        ),
    ] = None,
    metrics_allow_remote: Annotated[
        bool, typer.Option("--metrics-allow-remote", help="allow a non-loopback --metrics address")
    ] = False,
    cleanup_on_exit: Annotated[
        bool,
        typer.Option(
            "--cleanup-on-exit", help="on SIGTERM remove the table and reuseport groups we own"
        ),
    ] = False,
    watch_interval: Annotated[
        float,
        typer.Option(
            help="seconds between config-file checks (0: only SIGHUP/reload)", metavar="SECONDS"
        ),
    ] = 1.0,
    drift_interval: Annotated[
        float,
        typer.Option(
            help="seconds between drift checks: a change another writer made to the"
            " table is undone within this (0: never)",
            metavar="SECONDS",
        ),
    ] = 10.0,
    health_stale_after: Annotated[
        float,
        typer.Option(
            help="--metrics' /healthz fails once the main loop has not run for this long",
            metavar="SECONDS",
        ),
    ] = STALE_AFTER,
) -> None:
    """Apply CONFIG and keep the kernel in line with it until SIGTERM (reload: SIGHUP)."""
    from controlplane import __version__
    from controlplane.agent import daemon, logs
    from controlplane.errors import ConfigError, ConfigIssue
    from controlplane.kernel.netns import entered, require_root
    from controlplane.service.applier import KernelApplier
    from controlplane.service.kernel_view import KernelObserver

    if log_format not in ("plain", "json"):
        raise ConfigError([ConfigIssue("--log-format", f"{log_format!r}: use plain or json")])
    for flag, value in (("--watch-interval", watch_interval), ("--drift-interval", drift_interval)):
        if value < 0:
            raise ConfigError([ConfigIssue(flag, "must be >= 0")])
    if health_stale_after <= 0:
        raise ConfigError([ConfigIssue("--health-stale-after", "must be > 0")])
    listen = None
    if metrics is not None:
        from controlplane.agent.metrics import parse_listen

        listen = parse_listen(metrics, metrics_allow_remote)
    require_root("running the agent")
    # The name becomes part of the default socket and state paths: refuse a bad
    # or missing namespace before any directory is made for it.
    with entered(netns):
        pass
    log = logs.DecisionLog(logs.setup("json" if log_format == "json" else "plain"))
    opts = daemon.AgentOptions(
        config_path=config,
        netns=netns,
        state_path=state_file,
        socket_path=socket_path,
        cleanup_on_exit=cleanup_on_exit,
        watch_interval=watch_interval,
        drift_interval=drift_interval,
        metrics=listen,
        health_stale_after=health_stale_after,
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


def _client(netns: str | None, socket_path: Path | None) -> Any:
    from controlplane.agent.control import connect, default_socket_path

    path = socket_path or default_socket_path(netns)
    return connect(path)


@app.command()
@handles_errors
def reload(
    netns: NetnsOpt = None,
    socket_path: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the running agent to re-read its config (a bad config keeps the running one)."""
    client = _client(netns, socket_path)
    if client is None:
        where = f"network namespace {netns!r}" if netns else "the host"
        raise EnvironmentProblem(f"no agent is running for {where}")
    with client:
        resp = client.call("reload")
    if as_json:
        typer.echo(json.dumps(resp.result if resp.ok else {"error": resp.error}, indent=2))
    if resp.ok:
        if not as_json:
            summary = resp.result.get("summary", [])
            if resp.result.get("changed"):
                for line in summary:
                    typer.echo(line)
                typer.echo(f"reloaded: {len(summary)} change(s)")
            else:
                typer.echo("reloaded: no changes")
        return
    if not as_json:
        err(f"reload refused: {resp.error_message}")
        for issue in resp.error.get("issues", []):
            line = f" (line {issue['line']})" if issue.get("line") is not None else ""
            typer.echo(f"  {issue['path']}{line}: {issue['message']}", err=True)
    code = resp.error.get("exit_code")
    # The agent's own classification of the failure; an old agent without one: 5.
    known = isinstance(code, int) and code in set(ExitCode) and code != ExitCode.OK
    raise typer.Exit(code if known else ExitCode.KERNEL)


def status_lines(doc: dict[str, Any]) -> list[str]:
    """Human-readable status of an agent (the ``status`` op's result)."""
    import time

    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    k = doc["kernel"]
    lines = [
        f"verdict: {doc.get('verdict', 'unknown')}",
        f"agent pid {doc['pid']} ({doc['netns'] or 'host'}), config {doc['config_path']},"
        f" table {doc['table']}: {'present' if k['table_present'] else 'absent'}",
    ]
    for name, devs in sorted(k["flowtables"].items()):
        lines.append(f"  flowtable {name}: devices {{ {', '.join(devs)} }}")
    for name, c in sorted(k["counters"].items()):
        lines.append(f"  counter {name}: {c['packets']} packets, {c['bytes']} bytes")
    inv = doc.get("invalidation") or {}
    if inv.get("enabled"):
        # The invalidation index: every TCP/UDP entry, as *possibly* offloaded
        # (the kernel sets [OFFLOAD] without an event). Not a count of offloaded flows.
        lines.append(
            f"  flows indexed for invalidation (possibly offloaded): {inv.get('indexed_flows', 0)}"
        )
    lines.append(
        f"  conntrack entries: {k['conntrack']} ({k['offloaded']} offloaded)"
        + (f" as of {when(k['at'])}" if k.get("at") else "")
    )
    if k.get("error"):
        lines.append(f"  kernel view: {k['error']}")
    if inv.get("enabled"):
        causes = ", ".join(f"{c} {n}" for c, n in sorted(inv.get("by_cause", {}).items()))
        lines.append(
            f"  invalidations: {causes or 'none'}; events {inv.get('events', 0)},"
            f" overflows {inv.get('overflows', 0)}, resyncs {inv.get('resyncs', 0)}"
        )
    for group, facts in sorted(k.get("reuseport", {}).items()):
        if "error" in facts:
            lines.append(f"  reuseport group {group}: {facts['error']}")
            continue
        gens = " ".join(
            f"{g['generation']}{'*' if g['target'] else ''}({g['listeners']})"
            for g in facts["generations"]
        )
        counts = " ".join(f"{n} {c}" for n, c in facts["counters"].items())
        lines.append(
            f"  reuseport group {group}: prog id {facts['prog_id']}, generations"
            f" {gens or 'none'} (* = target); {counts}"
        )
    for name in ("last_apply", "last_reload"):
        out = doc.get(name)
        if out is None:
            continue
        verdict = (
            f"ok, {len(out['summary'])} change(s)" if out["ok"] else f"refused: {out['error']}"
        )
        label = name.replace("_", " ")
        lines.append(f"  {label}: {when(out['at'])} ({out['source']}) {verdict}")
    return lines


def agent_status(netns: str | None, as_json: bool, socket_path: Path | None = None) -> bool:
    """Print a running agent's status; False when no agent runs for ``netns``."""
    result = agent_answer(netns, "status", 30.0, socket_path)
    if result is None:
        return False
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for line in status_lines(result):
            typer.echo(line)
    return True


def agent_answer(
    netns: str | None, op: str, timeout: float, socket_path: Path | None, **args: Any
) -> Any:
    """A running agent's answer to ``op``; None when no agent runs for ``netns``."""
    client = _client(netns, socket_path)
    if client is None:
        return None
    with client:
        resp = client.call(op, timeout=timeout, **args)
    if not resp.ok:
        raise EnvironmentProblem(f"agent {op}: {resp.error_message}")
    return resp.result

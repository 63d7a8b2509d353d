"""``offloadctl agent`` (the host daemon) and ``offloadctl reload`` (its client).

``agent_status`` and ``agent_answer`` let ``offloadctl status`` / ``flows`` answer
from a running agent (None/False when none runs in that namespace: then the
caller reads the kernel).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli import agent_cmd
from controlplane.cli.common import JsonOpt, NetnsOpt, app
from controlplane.cli.errors import err, handles_errors
from controlplane.cli.fastparse import REQUIRED, typer_command, typer_param
from controlplane.errors import EnvironmentProblem, ExitCode

# Annotated: the default (None) is the function's, not typer.Option's.
SocketOpt = Annotated[Path | None, typer_param(replace(agent_cmd.SOCKET, default=REQUIRED))]

# The agent's options and behaviour live in cli/agent_cmd.py (main() starts it
# without typer); this is its typer command, for --help, usage errors, the man
# page and completion.
app.command("agent")(typer_command(agent_cmd.PARAMS, agent_cmd.HELP, agent_cmd.run))


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

"""``offloadctl flows``, ``flows teardown`` and ``watch``: the flowtable cache by hand.

Every selector value passes the same parsers as the engine's events
(``core/events.canonical_*``) before anything is read from the kernel: a bad
one is one line naming it, exit 2, nothing torn down.

Test-only: with ``OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED=1`` every conntrack
entry counts as offloaded. The host kernel of the test machines has no
flowtables, so no entry ever carries IPS_OFFLOAD there; the switch lets the
host netns tests drive the real teardown path. Never set it in production:
it makes teardown touch flows that are on the classic path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from controlplane.cli.common import NetnsOpt, app, load
from controlplane.cli.errors import handles_errors
from controlplane.errors import ConfigError, ConfigIssue

TESTING_ALL_OFFLOADED = "OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED"

flows_app = typer.Typer(
    help="Offloaded flows: list them, tear them down by MAC, IP, prefix or device.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(flows_app, name="flows")

JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object per line")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print decisions, change nothing")]


def only_offloaded() -> bool:
    return os.environ.get(TESTING_ALL_OFFLOADED) != "1"


def _flow_text(flow: Any) -> str:
    o = flow.orig
    proto = {6: "tcp", 17: "udp"}.get(o.proto, str(o.proto))
    zone = f" zone={flow.zone}" if flow.zone else ""
    return f"{proto} {o.src}:{o.sport} -> {o.dst}:{o.dport}{zone} id={flow.id}"


def _require_netns(netns: str | None) -> None:
    from controlplane.kernel.netns import entered, require_root

    require_root("reading conntrack")
    with entered(netns):  # unknown namespace: one line, exit 4, before any work
        pass


@flows_app.callback()
@handles_errors
def flows(ctx: typer.Context, netns: NetnsOpt = None, as_json: JsonOpt = False) -> None:
    """List the offloaded flows with the devices their path uses."""
    if ctx.invoked_subcommand is not None:
        return
    from controlplane.cli.agent import agent_flows

    if agent_flows(netns, as_json):  # a running agent answers from its flow index
        return
    from controlplane.kernel.ctnetlink.teardown import flows_with_devices

    _require_netns(netns)
    for flow, path, topology in flows_with_devices(netns, only_offloaded=only_offloaded()):
        orig = [topology.name(i) for i in path.orig.devices]
        reply = [topology.name(i) for i in path.reply.devices]
        if as_json:
            doc = flow.as_dict() | {"orig_devices": orig, "reply_devices": reply}
            doc["ambiguous"] = path.ambiguous
            typer.echo(json.dumps(doc, sort_keys=True))
        else:
            note = " (ambiguous)" if path.ambiguous else ""
            out = ">".join(orig) or "-"
            back = ">".join(reply) or "-"
            typer.echo(f"{_flow_text(flow)} out={out} back={back}{note}")


@flows_app.command("teardown")
@handles_errors
def flows_teardown(
    mac: Annotated[str | None, typer.Option("--mac", help="next-hop MAC")] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="endpoint or next-hop IP")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="endpoint prefix")] = None,
    dev: Annotated[str | None, typer.Option("--dev", help="device on the path")] = None,
    netns: NetnsOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Tear down the offloaded flows matching exactly one selector; print what was done."""
    from controlplane.core.flowselect import Selector

    given = [(k, v) for k, v in (("mac", mac), ("ip", ip), ("prefix", prefix), ("dev", dev)) if v]
    if len(given) != 1:
        raise ConfigError(
            [ConfigIssue("flows teardown", "give exactly one of --mac, --ip, --prefix, --dev")]
        )
    kind, value = given[0]
    try:
        selector = Selector.parse(kind, value)  # type: ignore[arg-type]
    except ValueError as exc:
        flag, _, reason = str(exc).partition(": ")
        raise ConfigError([ConfigIssue(flag, reason)]) from None
    _require_netns(netns)
    from controlplane.kernel.ctnetlink.teardown import teardown_selected

    report = teardown_selected(selector, netns, only_offloaded=only_offloaded(), dry_run=dry_run)
    verb = "would tear down" if dry_run else "tore down"
    for flow, devices in report.selected:
        if as_json:
            doc = flow.as_dict() | {"devices": list(devices), "dry_run": dry_run}
            typer.echo(json.dumps(doc, sort_keys=True))
        else:
            typer.echo(f"{verb} {_flow_text(flow)} via {','.join(devices) or '-'}")
    summary = (
        f"{selector}: {len(report.selected)} of {report.examined} flow(s) selected"
        + (
            ""
            if dry_run
            else f", {report.deleted} deleted, {report.recreated} re-created"
            f" on the classic path, {report.already_gone} already gone"
        )
        + f" ({report.elapsed * 1000:.1f} ms)"
    )
    if as_json:
        typer.echo(json.dumps({"summary": summary}))
    else:
        typer.echo(summary)


@app.command()
@handles_errors
def watch(
    config: Annotated[
        Path | None, typer.Argument(help="config file (its invalidation: section)")
    ] = None,
    netns: NetnsOpt = None,
    as_json: JsonOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Watch FDB, neighbour, route and link changes; tear stale offloaded flows down.

    One line per event and per decision; SIGINT/SIGTERM stop it cleanly.
    """
    from controlplane.config import InvalidationConfig

    settings = load(config).invalidation if config is not None else InvalidationConfig()
    if not settings.enabled:
        raise ConfigError(
            [ConfigIssue("invalidation.enabled", "is false in this config: nothing to watch")],
            source=str(config),
        )
    _require_netns(netns)
    from controlplane.agent.logs import journald_is_sink, line
    from controlplane.service.invalidation import InvalidationService

    stamp = not journald_is_sink(sys.stdout)  # the agent's format: logfmt or JSON, with ts

    def emit(record: dict[str, Any]) -> None:
        sys.stdout.write(line(record, "json" if as_json else "plain", time.time(), stamp) + "\n")
        sys.stdout.flush()

    service = InvalidationService(
        netns,
        settings,
        dry_run=dry_run,
        only_offloaded=only_offloaded(),
        report=emit,
    )
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        service.wake()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start()
        emit({"event": "ready", "netns": netns or "host", "dry_run": dry_run})
        while not stopping:
            service.step(timeout=1.0)
    finally:
        service.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    emit({"event": "stopped", "signal": signal.Signals(stopping[0]).name if stopping else ""})

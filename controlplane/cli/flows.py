"""``offloadctl flows``, ``flows teardown`` and ``watch``: the flowtable cache by hand.

Every selector value passes the same parsers as the engine's events
(``core/events.canonical_*``) before anything is read from the kernel: a bad
one is one line naming it, exit 2, nothing torn down.

``flows`` shows what conntrack holds (IPS_OFFLOAD and IPS_HW_OFFLOAD, TCP
state, counters), never an inference; ``flows teardown`` acts on the offloaded
flows of exactly the set ``flows`` lists for the same selector.

Test-only: with ``OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED=1`` ``flows teardown``
and ``watch`` take every entry as offloaded (``flows`` still shows the bits).
The host kernel of the test machines has no flowtables, so no entry ever
carries IPS_OFFLOAD there; the switch lets the host netns tests drive the real
teardown path. Never set it in production: it makes teardown touch flows that
are on the classic path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from controlplane.cli.agent import SocketOpt
from controlplane.cli.common import NetnsOpt, app, load
from controlplane.cli.errors import handles_errors
from controlplane.errors import ConfigError, ConfigIssue

if TYPE_CHECKING:
    from controlplane.core.flowselect import Selector

flows_app = typer.Typer(
    help="Forwarded flows as the kernel has them; tear offloaded ones down by MAC, IP,"
    " prefix or device.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(flows_app, name="flows")

JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object per line")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print decisions, change nothing")]


def only_offloaded() -> bool:
    """False under the test-only switch (core/flowbook.py: TESTING_ALL_OFFLOADED)."""
    from controlplane.core.flowbook import only_offloaded

    return only_offloaded(os.environ)


MacOpt = Annotated[str | None, typer.Option("--mac", help="next-hop MAC")]
IpOpt = Annotated[str | None, typer.Option("--ip", help="endpoint or next-hop IP")]
PrefixOpt = Annotated[str | None, typer.Option("--prefix", help="endpoint prefix")]
DevOpt = Annotated[str | None, typer.Option("--dev", help="device on the path")]


def parse_selector(
    mac: str | None, ip: str | None, prefix: str | None, dev: str | None, *, required: bool
) -> Selector | None:
    """The one selector of ``flows`` and ``flows teardown`` (exit 2 naming the flag)."""
    from controlplane.core.flowselect import Selector

    given = [(k, v) for k, v in (("mac", mac), ("ip", ip), ("prefix", prefix), ("dev", dev)) if v]
    if len(given) > 1 or (required and not given):
        what = "exactly" if required else "at most"
        raise ConfigError(
            [ConfigIssue("flows", f"give {what} one of --mac, --ip, --prefix, --dev")]
        )
    if not given:
        return None
    kind, value = given[0]
    try:
        return Selector.parse(kind, value)  # type: ignore[arg-type]
    except ValueError as exc:
        flag, _, reason = str(exc).partition(": ")
        raise ConfigError([ConfigIssue(flag, reason)]) from None


def _flow_text(flow: Any) -> str:
    o = flow.orig
    proto = {6: "tcp", 17: "udp"}.get(o.proto, str(o.proto))
    zone = f" zone={flow.zone}" if flow.zone else ""
    return f"{proto} {o.src}:{o.sport} -> {o.dst}:{o.dport}{zone} id={flow.id}"


def flow_line(f: dict[str, Any]) -> str:
    """One flow of ``offloadctl flows`` (kernel truth: the offload bits as conntrack
    has them; ``classic-in``: the per-device classic-path counters it enters by)."""
    proto = {6: "tcp", 17: "udp"}.get(f["proto"], str(f["proto"]))
    zone = f" zone={f['zone']}" if f["zone"] else ""
    state = "[OFFLOAD]" if f["offloaded"] else "classic"
    if f.get("hw_offloaded"):
        state += " [HW_OFFLOAD]"
    if f.get("tcp_state"):
        state += f" {f['tcp_state']}"
    packets = f" packets={f['packets'][0]}/{f['packets'][1]}" if f.get("packets") else ""
    out = ">".join(f.get("orig_devices", [])) or "-"
    back = ">".join(f.get("reply_devices", [])) or "-"
    classic = ""
    if f.get("classic_in"):
        per = {c["ingress"]: c["packets"] for c in f["classic_in"].values()}
        classic = " classic-in: " + ", ".join(f"{d} {n}" for d, n in sorted(per.items()))
    note = " (ambiguous)" if f.get("ambiguous") else ""
    return (
        f"{proto} {f['src']}:{f['sport']} -> {f['dst']}:{f['dport']}{zone} id={f['id']}"
        f" {state}{packets} out={out} back={back}{classic}{note}"
    )


def flows_summary(docs: list[dict[str, Any]]) -> str:
    offloaded = sum(1 for d in docs if d["offloaded"])
    hw = sum(1 for d in docs if d.get("hw_offloaded"))
    return f"{offloaded} of {len(docs)} forwarded flow(s) offloaded" + (
        f" ({hw} in hardware)" if hw else ""
    )


def _require_netns(netns: str | None) -> None:
    from controlplane.kernel.netns import entered, require_root

    require_root("reading conntrack")
    with entered(netns):  # unknown namespace: one line, exit 4, before any work
        pass


@flows_app.callback()
@handles_errors
def flows(
    ctx: typer.Context,
    netns: NetnsOpt = None,
    as_json: JsonOpt = False,
    mac: MacOpt = None,
    ip: IpOpt = None,
    prefix: PrefixOpt = None,
    dev: DevOpt = None,
    offloaded: Annotated[
        bool, typer.Option("--offloaded", help="only flows conntrack marks [OFFLOAD]")
    ] = False,
    table: Annotated[
        str | None,
        typer.Option(
            "--table",
            help="owned table whose counters to show (default: the agent's, else offloadctl)",
        ),
    ] = None,
    socket_path: SocketOpt = None,
) -> None:
    """List forwarded flows as the kernel has them: offload bits, devices, classic-path counters.

    The same selection as 'flows teardown' for the same selector. With a running
    agent, the counters are those of the table it owns (unless --table)."""
    if ctx.invoked_subcommand is not None:
        return
    selector = parse_selector(mac, ip, prefix, dev, required=False)
    if table is None:
        # A running agent only says which table it owns (its status, a few ms);
        # the flows are read here, from the kernel, as the agent would read them,
        # so a big conntrack table never holds the agent's loop.
        from controlplane.cli.agent import agent_answer

        agent = agent_answer(netns, "status", 30.0, socket_path)
        table = str(agent["table"]).split()[-1] if agent and agent.get("table") else "offloadctl"
    from controlplane.kernel.flowstate import read_flow_docs

    ref = _table_name(table)
    _require_netns(netns)
    docs, _ = read_flow_docs(netns, ref, selector, offloaded, None)
    for doc in docs:
        typer.echo(json.dumps(doc, sort_keys=True) if as_json else flow_line(doc))
    if not as_json:
        typer.echo(flows_summary(docs))


def _table_name(name: str) -> str:
    from controlplane.core import nft

    if not nft.is_objname(name):
        raise ConfigError([ConfigIssue("--table", f"invalid table name {name!r}")])
    return name


@flows_app.command("teardown")
@handles_errors
def flows_teardown(
    mac: MacOpt = None,
    ip: IpOpt = None,
    prefix: PrefixOpt = None,
    dev: DevOpt = None,
    netns: NetnsOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Tear down the offloaded flows among those 'flows' lists for one selector."""
    selector = parse_selector(mac, ip, prefix, dev, required=True)
    assert selector is not None
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
        f"{selector}: {report.matched} forwarded flow(s) selected (as 'flows' lists them),"
        f" {len(report.selected)} offloaded"
        + (
            ""
            if dry_run
            else f"; {report.deleted} deleted, {report.recreated} re-created"
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

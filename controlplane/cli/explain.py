"""``offloadctl explain``: is this flow (or device) on the fast path, and if not, why.

The reasoning is ``core/explain.py`` (pure); ``kernel/explain.py`` gathers the
facts. Exit 0: every flow or device asked about is on the fast path; 1: one
is not (each reason printed); 4: no such flow or device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from controlplane.cli.agent import SocketOpt
from controlplane.cli.common import NetnsOpt, app, load
from controlplane.cli.errors import handles_errors
from controlplane.core.numbers import ascii_decimal
from controlplane.errors import ConfigError, ConfigIssue, EnvironmentProblem, ExitCode

if TYPE_CHECKING:
    from controlplane.config import OffloadPolicy
    from controlplane.core.flowpath import Flow

_PROTOS = {"tcp": 6, "udp": 17}


def parse_tuple(words: list[str]) -> tuple[int, str, int, str, int]:
    """``PROTO SRC:PORT [->] DST:PORT`` (IPv6 as ``[ADDR]:PORT``), as ``flows`` prints it."""
    from controlplane.core.events import canonical_ip

    parts = [w for w in words if w != "->"]
    if len(parts) != 3 or parts[0].lower() not in _PROTOS:
        raise ConfigError(
            [ConfigIssue("FLOW", "expected 'tcp|udp SRC:PORT DST:PORT' (as 'flows' prints it)")]
        )

    def endpoint(text: str, field: str) -> tuple[str, int]:
        host, sep, port_text = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        port = ascii_decimal(port_text)
        if not sep or port is None or not 0 <= port <= 65535:
            raise ConfigError([ConfigIssue(field, f"{text!r} is not ADDRESS:PORT")])
        try:
            return canonical_ip(host, field), port
        except ValueError as exc:
            raise ConfigError([ConfigIssue(field, str(exc).partition(": ")[2])]) from None

    src, sport = endpoint(parts[1], "FLOW source")
    dst, dport = endpoint(parts[2], "FLOW destination")
    return _PROTOS[parts[0].lower()], src, sport, dst, dport


def _matches(flow: Flow, want: tuple[int, str, int, str, int]) -> bool:
    proto, src, sport, dst, dport = want
    return any(
        (t.proto, t.src, t.sport, t.dst, t.dport) == (proto, src, sport, dst, dport)
        for t in (flow.orig, flow.reply)
    )


def _policies(
    config: Path | None, netns: str | None, socket_path: Path | None
) -> tuple[tuple[OffloadPolicy, ...] | None, str, str]:
    """(policies, table name, where they came from): --config, else the agent's file."""
    if config is None:
        from controlplane.cli.agent import agent_answer

        doc = agent_answer(netns, "status", 30.0, socket_path)
        if doc is None or not doc.get("config_path"):
            return None, "offloadctl", "no config"
        import hashlib

        config = Path(doc["config_path"])
        source = f"the agent's config {config}"
        try:
            changed = hashlib.sha256(config.read_bytes()).hexdigest() != doc.get("config_sha256")
        except OSError:
            changed = False  # load() says why it cannot read it
        if changed:
            source += " (changed since the agent loaded it: its running policies may differ)"
    else:
        source = str(config)
    cfg = load(config)
    return tuple(cfg.policies), cfg.table.name, source


@app.command()
@handles_errors
def explain(
    flow: Annotated[
        list[str] | None,
        typer.Argument(
            help="a flow: tcp|udp SRC:PORT DST:PORT ([ADDR]:PORT for IPv6; after --, the"
            " '->' of 'flows' lines is accepted too)",
            metavar="FLOW",
        ),
    ] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="every flow with this endpoint")] = None,
    ct_id: Annotated[int | None, typer.Option("--id", help="the conntrack entry's id")] = None,
    dev: Annotated[str | None, typer.Option("--dev", help="a device instead of a flow")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="the config whose policies to check (default: the running agent's)",
            show_default=False,
        ),
    ] = None,
    netns: NetnsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per subject")] = False,
    socket_path: SocketOpt = None,
) -> None:
    """Is a flow (or a device) on the fast path? If not, every reason, each from evidence.

    Exit 0: on the fast path; 1: not (reasons printed); 4: no such flow or device."""
    from controlplane.core import explain as core

    given = sum(x is not None for x in (flow or None, ip, ct_id, dev))
    if given != 1:
        raise ConfigError([ConfigIssue("explain", "give exactly one of FLOW, --ip, --id, --dev")])
    want = parse_tuple(flow) if flow else None
    selector = None
    if dev is not None:
        from controlplane.cli.flows import parse_selector

        selector = parse_selector(None, None, None, dev, required=True)
    if ip is not None:
        from controlplane.core.events import canonical_ip

        try:
            ip = canonical_ip(ip, "--ip")
        except ValueError as exc:
            raise ConfigError([ConfigIssue("--ip", str(exc).partition(": ")[2])]) from None
    from controlplane.kernel.netns import entered, require_root

    require_root("reading conntrack and the ruleset")
    with entered(netns):
        pass
    policies, table, source = _policies(config, netns, socket_path)
    from controlplane.core import nft
    from controlplane.kernel.explain import gather

    facts = gather(netns, nft.TableRef("inet", table), policies)
    if selector is not None:
        from controlplane.core.flowselect import select_flows

        if facts.world.topology.ifindex(selector.value) is None:
            where = f" in network namespace {netns!r}" if netns else ""
            raise EnvironmentProblem(f"--dev: no device {selector.value!r}{where}")
        flows = [f for f, _ in facts.entries if f.offloaded]
        through = select_flows(flows, facts.world.topology, selector)
        results = [core.explain_device(facts.world, selector.value, len(through))]
    else:
        picked = [
            (f, ct)
            for f, ct in facts.entries
            if (want is not None and _matches(f, want))
            or (ct_id is not None and f.id == ct_id)
            or (ip is not None and ip in (f.orig.src, f.orig.dst, f.reply.src, f.reply.dst))
        ]
        if not picked:
            what = (
                " ".join(flow) if flow else (f"--id {ct_id}" if ct_id is not None else f"--ip {ip}")
            )
            raise EnvironmentProblem(f"no conntrack entry matches {what}")
        results = [core.explain_flow(facts.world, f, ct) for f, ct in picked]
    for res in results:
        if as_json:
            doc: dict[str, Any] = res.as_dict() | {"policies_from": source}
            typer.echo(json.dumps(doc, sort_keys=True))
        else:
            for line in res.lines():
                typer.echo(line)
    if not as_json:
        typer.echo(f"(policies: {source})")
    if not all(r.fast_path for r in results):
        raise typer.Exit(ExitCode.CHANGES)

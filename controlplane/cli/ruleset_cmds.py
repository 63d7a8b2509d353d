"""Commands on the owned nftables table: plan, apply, show, flush, status, probe.

Every flag value that ends up naming something in the kernel passes the
config's own parser first (``--table`` is an ObjName): a bad one exits 2 and
never reaches nft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli.agent import SocketOpt
from controlplane.cli.common import ConfigArg, JsonOpt, NetnsOpt, app, load, table_name
from controlplane.cli.errors import handles_errors
from controlplane.errors import EnvironmentProblem, ExitCode

TableOpt = Annotated[
    str, typer.Option("--table", help="owned table name (inet family)", metavar="TABLE")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="write although an agent manages this table (it restores its config"
        " on its next drift check)",
    ),
]


def _table_ref(name: str) -> object:
    from controlplane.core import nft

    return nft.TableRef("inet", table_name(name))


@app.command()
@handles_errors
def plan(config: ConfigArg, netns: NetnsOpt = None) -> None:
    """Show what 'apply' would change (same preflight); exit 0 if nothing, 1 if something."""
    from controlplane import service

    the_plan = service.plan(load(config), netns)
    for line in the_plan.devices:  # the derived flowtable devices and why
        typer.echo(f"# {line}")
    if the_plan.empty:
        typer.echo("no changes: the kernel already has this ruleset")
        return
    # One write for the whole listing (echo flushes per call: 1,000 rules, 1,000 writes).
    lines = [*the_plan.summary, *(f"drift: {line}" for line in the_plan.drift)]
    if lines:
        typer.echo("\n".join(lines))
    raise typer.Exit(ExitCode.CHANGES)


def _refuse_if_agent_owns(
    family: str, name: str, netns: str | None, socket_path: Path | None, force: bool
) -> None:
    """Exit 4 when a running agent manages this table: two writers would undo
    each other. The agent is asked (its control socket), not guessed at."""
    from controlplane.cli.agent import agent_answer
    from controlplane.core.preflight import agent_owner_problem

    answer = agent_answer(netns, "status", 10.0, socket_path)
    problem = agent_owner_problem(f"{family} {name}", answer, netns, force)
    if problem is not None:
        raise EnvironmentProblem(problem)


@app.command()
@handles_errors
def apply(
    config: ConfigArg,
    netns: NetnsOpt = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="run the whole preflight and have the kernel validate the"
            " transaction without committing",
        ),
    ] = False,
    force: ForceOpt = False,
    socket_path: SocketOpt = None,
) -> None:
    """Apply the config in one nftables transaction (all or nothing)."""
    from controlplane import service

    cfg = load(config)
    if not check:
        _refuse_if_agent_owns(cfg.table.family, cfg.table.name, netns, socket_path, force)
    res = service.apply(cfg, netns, check=check)
    if res.plan.empty:
        typer.echo("no changes: the kernel already has this ruleset")
        return
    if res.plan.summary:  # one write (see plan)
        typer.echo("\n".join(res.plan.summary))
    if res.checked_only:
        typer.echo("check passed: the kernel accepts this transaction (not committed)")
        return
    if res.vlans_created:
        typer.echo(f"created vlan devices: {', '.join(res.vlans_created)}")
    if res.teardown is not None:
        t = res.teardown
        typer.echo(
            f"tore down {t.deleted} offloaded flow(s) through removed devices"
            f" (examined {t.examined}; {t.recreated} re-created on the classic path"
            f" in {t.elapsed * 1000:.0f} ms)"
        )
    typer.echo(f"applied in {res.seconds * 1000:.0f} ms ({len(res.plan.ops)} operations)")


@app.command()
@handles_errors
def show(
    netns: NetnsOpt = None,
    table: TableOpt = "offloadctl",
    as_json: JsonOpt = False,
) -> None:
    """Print the owned table as the kernel has it (exit 4 if it does not exist)."""
    from controlplane.core import nft
    from controlplane.kernel.netns import require_root
    from controlplane.kernel.nft.libnft import Nft

    ref = _table_ref(table)
    assert isinstance(ref, nft.TableRef)
    require_root("reading the kernel's ruleset")
    ctx = Nft(netns)
    text = ctx.show(ref)
    if text is None:
        raise EnvironmentProblem(f"table {ref.spec} does not exist")
    if as_json:
        observed = ctx.list_table(ref)
        assert observed is not None
        doc = {
            "table": ref.spec,
            "marker": observed.marker,
            "chains": {name: [r.text for r in observed.rules_of(name)] for name in observed.chains},
            "flowtables": {n: sorted(f.devices) for n, f in observed.flowtables.items()},
            "counters": sorted(observed.counters),
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(text, nl=False)


@app.command()
@handles_errors
def flush(
    config: ConfigArg,
    netns: NetnsOpt = None,
    force: ForceOpt = False,
    socket_path: SocketOpt = None,
) -> None:
    """Delete the owned table (tears down every flow it offloaded); never a foreign one."""
    from controlplane import service

    cfg = load(config)
    _refuse_if_agent_owns(cfg.table.family, cfg.table.name, netns, socket_path, force)
    if service.flush(cfg, netns):
        typer.echo(f"deleted table {cfg.table.family} {cfg.table.name}")
    else:
        typer.echo(f"table {cfg.table.family} {cfg.table.name} does not exist")


@app.command()
@handles_errors
def status(
    netns: NetnsOpt = None,
    table: Annotated[
        str | None,
        typer.Option(
            "--table",
            help="owned table name (inet family; default offloadctl); read from the kernel"
            " even when an agent runs",
            show_default=False,
            metavar="TABLE",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="compare with this config: report drift (exit 1)", show_default=False
        ),
    ] = None,
    as_json: JsonOpt = False,
    socket_path: SocketOpt = None,
) -> None:
    """Verdict line, then table, ownership, flowtable devices, counters, flows, drift.

    Answered by the namespace's agent when one runs (unless --table or --config
    asks another question). With --config: exit 1 when the kernel drifted from it."""
    if config is None and table is None:
        from controlplane.cli.agent import agent_status

        if agent_status(netns, as_json, socket_path):
            return
    from controlplane import service
    from controlplane.core import nft
    from controlplane.kernel import status as st

    the_plan = None
    if config is not None:
        cfg = load(config)
        ref = nft.TableRef(cfg.table.family, cfg.table.name)
        the_plan = service.plan(cfg, netns)
    else:
        parsed = _table_ref(table or "offloadctl")
        assert isinstance(parsed, nft.TableRef)
        ref = parsed
    info = st.collect(ref, netns, the_plan)
    drifted = bool(info["drift"]) or (the_plan is not None and not the_plan.empty)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for line in _status_lines(ref.spec, info, the_plan is not None):
            typer.echo(line)
    if config is not None and drifted:
        raise typer.Exit(ExitCode.CHANGES)


def _status_lines(spec: str, info: dict[str, Any], drift_asked: bool) -> list[str]:
    lines = [f"verdict: {info['verdict']}"]
    if not info["table"]:
        lines.append(f"table {spec}: absent")
        return lines + [f"  drift: {line}" for line in info["drift"]]
    lines.append(f"table {spec}: present ({info['ownership']})")
    for ft in info["flowtables"]:
        lines.append(f"  flowtable {ft['name']}: devices {{ {', '.join(ft['devices'])} }}")
    for name, c in info["counters"].items():
        lines.append(f"  counter {name}: {c['packets']} packets, {c['bytes']} bytes")
    lines.append(f"  conntrack entries: {info['conntrack']} ({info['offloaded']} offloaded)")
    # Issue 9 (H3): inputs whose direction is not offloaded although conntrack says so.
    for r in info.get("classic_path_by_input", []):
        if r["suspect"]:
            lines.append(
                f"  not offloaded: input {r['ingress']}: {r['packets']} packets of offloaded"
                " flows took the classic path (is its real device in the flowtable?)"
            )
    if info.get("offloaded_one_direction"):
        lines.append(
            f"  {info['offloaded_one_direction']} flow(s) [OFFLOAD] in conntrack with one"
            " direction on the classic path (not counted as offloaded)"
        )
    lines += [f"  drift: {line}" for line in info["drift"]]
    if drift_asked and not info["drift"]:
        lines.append("  drift: none")
    return lines


@app.command(name="probe")
@handles_errors
def probe_cmd(
    netns: NetnsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What this kernel supports: flowtables, VLAN, bpffs, reuseport migration, conntrack.

    Exit 3 when the kernel cannot offload (no flowtables), 0 when it can."""
    from controlplane.kernel import probe
    from controlplane.kernel.netns import require_root

    require_root("probing the kernel")
    caps = probe.probe_all(netns)
    if as_json:
        typer.echo(json.dumps([c.as_dict() for c in caps], indent=2))
    else:
        for c in caps:
            typer.echo(f"{c.name:<20} {'yes' if c.ok else 'no ':<4} {c.reason}")
    # The answer a script wants ("can this host offload?") is the exit code.
    if not any(c.ok for c in caps if c.name == "flowtables"):
        raise typer.Exit(ExitCode.UNSUPPORTED)

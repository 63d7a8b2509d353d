"""Commands on the owned nftables table: plan, apply, show, flush, status, probe."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from controlplane.cli.common import ConfigArg, NetnsOpt, app, load
from controlplane.cli.errors import err as _err
from controlplane.cli.errors import handles_errors


@app.command()
@handles_errors
def plan(config: ConfigArg, netns: NetnsOpt = None) -> None:
    """Show what 'apply' would change; exit 0 if nothing, 1 if something."""
    from controlplane import applier

    the_plan = applier.plan(load(config), netns)
    if the_plan.empty:
        typer.echo("no changes: the kernel already has this ruleset")
        return
    for line in the_plan.summary:
        typer.echo(line)
    raise typer.Exit(1)


@app.command()
@handles_errors
def apply(
    config: ConfigArg,
    netns: NetnsOpt = None,
    check: Annotated[
        bool, typer.Option("--check", help="have the kernel validate without committing")
    ] = False,
) -> None:
    """Apply the config in one nftables transaction (all or nothing)."""
    from controlplane import applier

    res = applier.apply(load(config), netns, check=check)
    if res.plan.empty:
        typer.echo("no changes: the kernel already has this ruleset")
        return
    for line in res.plan.summary:
        typer.echo(line)
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
    table: Annotated[str, typer.Option(help="owned table name")] = "offloadctl",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the owned table as the kernel has it."""
    from controlplane.kernel.netns import require_root
    from controlplane.kernel.nft.libnft import Nft

    require_root("reading the kernel's ruleset")
    ctx = Nft(netns)
    listing = ctx.list_table("inet", table)
    if listing is None:
        _err(f"table inet {table} does not exist")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(listing[0], indent=2))
    else:
        typer.echo(ctx.list_text(f"list table inet {table}"), nl=False)


@app.command()
@handles_errors
def flush(config: ConfigArg, netns: NetnsOpt = None) -> None:
    """Delete the owned table (tears down every flow it offloaded)."""
    from controlplane import applier

    cfg = load(config)
    if applier.flush(cfg, netns):
        typer.echo(f"deleted table {cfg.table.family} {cfg.table.name}")
    else:
        typer.echo(f"table {cfg.table.family} {cfg.table.name} does not exist")


@app.command()
@handles_errors
def status(
    netns: NetnsOpt = None,
    table: Annotated[str, typer.Option(help="owned table name")] = "offloadctl",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Owned table, flowtable devices, classic-path counter, offloaded flows."""
    from controlplane.kernel import status as st

    info = st.collect(table, netns)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    if not info["table"]:
        typer.echo(f"table inet {table}: absent")
        return
    typer.echo(f"table inet {table}: present")
    for ft in info["flowtables"]:
        typer.echo(f"  flowtable {ft['name']}: devices {{ {', '.join(ft['devices'])} }}")
    for name, c in info["counters"].items():
        typer.echo(f"  counter {name}: {c['packets']} packets, {c['bytes']} bytes")
    typer.echo(f"  conntrack entries: {info['conntrack']} ({info['offloaded']} offloaded)")


@app.command(name="probe")
@handles_errors
def probe_cmd(
    netns: NetnsOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What this kernel supports: flowtables, VLAN, bpffs, reuseport migration, conntrack."""
    from controlplane.kernel import probe
    from controlplane.kernel.netns import require_root

    require_root("probing the kernel")
    caps = probe.probe_all(netns)
    if as_json:
        typer.echo(json.dumps([c.as_dict() for c in caps], indent=2))
        return
    for c in caps:
        typer.echo(f"{c.name:<20} {'yes' if c.ok else 'no ':<4} {c.reason}")

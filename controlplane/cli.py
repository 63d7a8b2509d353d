"""``offloadctl``: the command line. Every error is one clear line and an exit code.

Exit codes: 0 ok · 1 ``plan``: changes pending · 2 invalid config or usage ·
3 kernel lacks a feature · 4 environment (root, netns, device, bpffs) ·
5 the kernel refused the transaction (previous state kept).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli_errors import err as _err
from controlplane.cli_errors import handles_errors
from controlplane.config import Config
from controlplane.loader import load_config

app = typer.Typer(
    name="offloadctl",
    help="Kernel-offload control plane: nftables flowtables, reuseport migration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="config file (YAML or JSON)", show_default=False)]
NetnsOpt = Annotated[
    str | None,
    typer.Option("--netns", help="network namespace name (ip netns)", show_default=False),
]


def _load(path: Path) -> Config:
    return load_config(path)


@app.command()
@handles_errors
def validate(config: ConfigArg) -> None:
    """Check a config file; print every problem with its field path and line."""
    cfg = _load(config)
    typer.echo(
        f"{config}: ok ({len(cfg.flowtables)} flowtable(s), {len(cfg.policies)} policy(ies),"
        f" {len(cfg.vlans)} vlan(s))"
    )


@app.command()
def schema() -> None:
    """Print the config's JSON Schema."""
    typer.echo(json.dumps(Config.model_json_schema(), indent=2))


@app.command()
@handles_errors
def render(
    config: ConfigArg,
    fmt: Annotated[str, typer.Option("--format", help="json or nft")] = "nft",
    netns: Annotated[
        str | None,
        typer.Option("--netns", help="resolve bridge ports in this namespace", show_default=False),
    ] = None,
) -> None:
    """Render the owned table. Pure unless --netns is given to resolve bridge ports."""
    from controlplane.core import nft
    from controlplane.core.render import Facts
    from controlplane.core.render import render as do_render

    if fmt not in ("json", "nft"):
        _err("--format must be 'json' or 'nft'")
        raise typer.Exit(2)
    cfg = _load(config)
    facts = Facts()
    if netns is not None:
        from controlplane.applier import gather_facts

        facts = gather_facts(cfg, netns)
    elif any(ft.bridges for ft in cfg.flowtables):
        _err("note: bridge ports join flowtables at apply time (--netns NS resolves them now)")
    rs = do_render(cfg, facts)
    if fmt == "json":
        typer.echo(json.dumps(nft.ruleset_json(rs), indent=2))
    else:
        typer.echo(nft.ruleset_text(rs), nl=False)


@app.command()
@handles_errors
def plan(config: ConfigArg, netns: NetnsOpt = None) -> None:
    """Show what 'apply' would change; exit 0 if nothing, 1 if something."""
    from controlplane import applier

    the_plan = applier.plan(_load(config), netns)
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

    res = applier.apply(_load(config), netns, check=check)
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
    from controlplane.kernel.libnft import Nft
    from controlplane.kernel.netns import require_root

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

    cfg = _load(config)
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


def _mount_subapps() -> None:
    try:
        from controlplane.cli_reuseport import app as reuseport_app
    except ImportError:  # pragma: no cover
        return
    app.add_typer(reuseport_app, name="reuseport", help="SO_REUSEPORT listener migration")


_mount_subapps()


def main(argv: list[str] | None = None) -> Any:
    try:
        return app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        if exc.code not in (0, None) and isinstance(exc.code, int):
            sys.exit(exc.code)
        raise


if __name__ == "__main__":
    main()

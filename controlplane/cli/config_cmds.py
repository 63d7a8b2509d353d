"""Commands that only read a config: validate, schema, render."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from controlplane.cli.common import ConfigArg, app, load
from controlplane.cli.errors import err as _err
from controlplane.cli.errors import handles_errors
from controlplane.errors import ConfigError, ConfigIssue


@app.command()
@handles_errors
def validate(config: ConfigArg) -> None:
    """Check a config file; print every problem with its field path and line."""
    cfg = load(config)
    name = "<stdin>" if str(config) == "-" else config
    typer.echo(
        f"{name}: ok ({len(cfg.flowtables)} flowtable(s), {len(cfg.policies)} policy(ies),"
        f" {len(cfg.vlans)} vlan(s))"
    )


@app.command()
def schema() -> None:
    """Print the config's JSON Schema."""
    from controlplane.config import Config

    typer.echo(json.dumps(Config.model_json_schema(), indent=2))


@app.command()
@handles_errors
def render(
    config: ConfigArg,
    fmt: Annotated[
        str, typer.Option("--format", help="nft (text) or json", metavar="nft|json")
    ] = "nft",
    netns: Annotated[
        str | None,
        typer.Option(
            "--netns",
            help="resolve bridge ports in this namespace",
            show_default=False,
            metavar="NS",
        ),
    ] = None,
) -> None:
    """Render the owned table. Pure unless --netns is given to resolve bridge ports."""
    from controlplane.core import nft
    from controlplane.core.render import Facts
    from controlplane.core.render import render as do_render

    if fmt not in ("json", "nft"):
        raise ConfigError([ConfigIssue("--format", f"{fmt!r}: use nft or json")])
    cfg = load(config)
    facts = Facts()
    if netns is not None:
        from controlplane.core.devices import explain
        from controlplane.core.render import device_sets
        from controlplane.kernel.netns import entered
        from controlplane.kernel.rtnl.facts import gather_facts

        with entered(netns):  # a missing namespace is exit 4, even with nothing to resolve
            pass
        facts = gather_facts(cfg, netns)
        # Which devices each flowtable hooks and why (stderr: stdout stays loadable).
        for line in explain(device_sets(cfg, facts)):
            typer.echo(line, err=True)
    elif any(ft.bridges for ft in cfg.flowtables):
        _err("note: bridge ports join flowtables at apply time (--netns NS resolves them now)")
    rs = do_render(cfg, facts)
    if fmt == "json":
        typer.echo(json.dumps(nft.ruleset_json(rs), indent=2))
    else:
        typer.echo(nft.ruleset_text(rs), nl=False)

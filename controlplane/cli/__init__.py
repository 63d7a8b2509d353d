"""``offloadctl``: the command line. Every error is one clear line and an exit code
(``controlplane.errors.ExitCode``; the README's table lists them).

Commands live in per-area modules (config_cmds, ruleset_cmds, reuseport, flows,
agent) that register on ``common.app`` when imported (``@app.command()`` or
``app.add_typer(...)``). Only the module of the command being run is imported,
so ``offloadctl validate`` does not pay for BPF, netlink or libnftables.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from controlplane.cli.common import app, conventional, exit_codes_epilog
from controlplane.errors import ExitCode

COMPLETE_VAR = "_OFFLOADCTL_COMPLETE"  # set by the script `offloadctl completion` prints

# command -> the module under controlplane.cli that registers it. A command
# missing here still works (an unknown name imports every AREA_MODULES entry:
# slower start-up); adding its line makes it start fast.
COMMANDS: dict[str, str] = {
    "validate": "config_cmds",
    "schema": "config_cmds",
    "render": "config_cmds",
    "plan": "ruleset_cmds",
    "apply": "ruleset_cmds",
    "show": "ruleset_cmds",
    "flush": "ruleset_cmds",
    "status": "ruleset_cmds",
    "probe": "ruleset_cmds",
    "flows": "flows",
    "watch": "flows",
    "explain": "explain",
    "agent": "agent",
    "reload": "agent",
    "reuseport": "reuseport",
    "completion": "completion",
}
AREA_MODULES = (
    "config_cmds",
    "ruleset_cmds",
    "flows",
    "explain",
    "agent",
    "reuseport",
    "completion",
)
# Modules whose own typer ``app`` is mounted as a command group (they do not
# register themselves on common.app): module -> (group name, help).
SUBAPPS: dict[str, tuple[str, str]] = {
    "reuseport": ("reuseport", "SO_REUSEPORT listener migration"),
}
# Commands that read, decide, write and exit. main() runs them without the
# cyclic garbage collector: start-up and a 1,000-rule apply allocate millions
# of objects and the collections cost ~6% of the instructions, for garbage
# that dies with the process anyway (input size is bounded by the loader).
# Every other command (agent, watch, ...) runs with it, as usual.
ONE_SHOT = frozenset(
    {
        "validate",
        "schema",
        "render",
        "plan",
        "apply",
        "show",
        "flush",
        "status",
        "probe",
        "completion",
    }
)


def _import_area(module: str) -> None:
    name = f"controlplane.cli.{module}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:  # an area that does not exist (yet) in this tree
            return
        raise
    if module in SUBAPPS:
        group, help_text = SUBAPPS[module]
        if all(g.name != group for g in app.registered_groups):
            app.add_typer(mod.app, name=group, help=help_text)


class _AreaCommands(TyperGroup):
    """A click group that imports a command's module the first time it is asked for."""

    def _refresh(self) -> None:
        built = typer.main.get_group(app)
        for name, cmd in built.commands.items():
            self.commands.setdefault(name, cmd)
        conventional(self)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in ONE_SHOT:
            gc.enable()
        if cmd_name not in self.commands:
            module = COMMANDS.get(cmd_name)
            for area in (module,) if module else AREA_MODULES:
                _import_area(area)
            self._refresh()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: Any) -> list[str]:
        for area in AREA_MODULES:
            try:
                _import_area(area)
            except ImportError:  # e.g. reuseport without bcc: list what works
                continue
        self._refresh()
        return super().list_commands(ctx)


app.info.cls = _AreaCommands
app.info.epilog = exit_codes_epilog()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"offloadctl {version('controlplane')}")
        except PackageNotFoundError:  # running from a source tree that is not installed
            typer.echo("offloadctl (not installed: version unknown)")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", help="print the version and exit", is_eager=True, callback=_version
    ),
) -> None:
    """Kernel-offload control plane: nftables flowtables, reuseport migration."""


def main(argv: list[str] | None = None) -> Any:
    # pydantic looks for plugins (the "pydantic" entry-point group of every
    # installed distribution) the first time a model builds its validator:
    # ~12 M instructions per command. offloadctl uses no pydantic plugin, so it
    # says so; an operator's own setting of the variable is kept.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if COMPLETE_VAR in os.environ:  # the shell asks for completions (cli/completion.py)
        from controlplane.cli.completion import enable

        enable()
    collecting = gc.isenabled()
    gc.disable()  # see ONE_SHOT
    try:
        return app(
            args=argv, standalone_mode=True, prog_name="offloadctl", complete_var=COMPLETE_VAR
        )
    except SystemExit as exc:
        if exc.code not in (ExitCode.OK, None) and isinstance(exc.code, int):
            sys.exit(exc.code)
        raise
    finally:
        if collecting:
            gc.enable()


if __name__ == "__main__":
    main()

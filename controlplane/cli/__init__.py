"""``offloadctl``: the command line. Every error is one clear line and an exit code
(``controlplane.errors.ExitCode``; the README's table lists them).

Commands live in per-area modules (config_cmds, ruleset_cmds, reuseport, flows,
agent) that register on ``common.app`` when imported (``@app.command()`` or
``app.add_typer(...)``). Only the module of the command being run is imported,
so ``offloadctl validate`` does not pay for BPF, netlink or libnftables.

This package itself imports nothing heavy: ``main`` runs ``reuseport exec``
without typer or pydantic (cli/exec_cmd.py: a restart's start-up CPU competes
with the server it restarts) and ``agent`` without typer or click
(cli/agent_cmd.py: their RSS, for the daemon's life), and imports the typer
app (cli/common.py, which also makes its group lazy-loading with the tables
below) for everything else.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from typing import Any

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
# Whether main() turned pydantic's plugins off (then the servers that
# 'reuseport exec' starts must not inherit the setting: cli/exec_cmd.py).
plugins_off_by_us = False


def _import_area(module: str) -> None:
    name = f"controlplane.cli.{module}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:  # an area that does not exist (yet) in this tree
            return
        raise
    if module in SUBAPPS:
        from controlplane.cli.common import app

        group, help_text = SUBAPPS[module]
        if all(g.name != group for g in app.registered_groups):
            app.add_typer(mod.app, name=group, help=help_text)


def main(argv: list[str] | None = None) -> Any:
    args = sys.argv[1:] if argv is None else argv
    if args[:2] == ["reuseport", "exec"] and COMPLETE_VAR not in os.environ:
        from controlplane.cli.exec_cmd import fast_main

        code = fast_main(args[2:])
        if code is not None:
            sys.exit(code)
        # else: --help, a usage error or a spelling the fast parser leaves to click
    if args[:1] == ["agent"]:
        # Before the imports, so that their heap is not in huge pages either
        # (docs/agent.md, "Memory").
        from controlplane.kernel.memory import disable_thp, fix_malloc_thresholds

        disable_thp()
        fix_malloc_thresholds()
    # pydantic looks for plugins (the "pydantic" entry-point group of every
    # installed distribution) the first time a model builds its validator:
    # ~12 M instructions per command. offloadctl uses no pydantic plugin, so it
    # says so; an operator's own setting of the variable is kept.
    global plugins_off_by_us
    if "PYDANTIC_DISABLE_PLUGINS" not in os.environ:
        os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
        plugins_off_by_us = True
    if args[:1] == ["agent"] and COMPLETE_VAR not in os.environ:
        # Without typer/click: ~5 MB of the daemon's RSS (cli/agent_cmd.py).
        from controlplane.cli.agent_cmd import fast_main as agent_main

        code = agent_main(args[1:])
        if code is not None:
            sys.exit(code)
    if COMPLETE_VAR in os.environ:  # the shell asks for completions (cli/completion.py)
        from controlplane.cli.completion import enable

        enable()
    from controlplane.cli.common import app

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

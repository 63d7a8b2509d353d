"""What every command module shares: the typer app, common arguments, config loading,
and the command-line conventions every command follows (``conventional``).

Kept light: a command module imports this at start-up, so the config models
(pydantic) and the YAML parser are imported only by the commands that load a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperArgument

from controlplane.errors import EXIT_MEANINGS, ExitCode

if TYPE_CHECKING:
    from controlplane.config import Config

E = ExitCode
# The exit codes each verb uses besides 70 (a bug) and 130 (SIGINT), which any
# may. Its --help ends with them; README.md's verb table must agree (a test
# walks both).
VERB_EXITS: dict[str, tuple[ExitCode, ...]] = {
    "validate": (E.OK, E.USAGE),
    "schema": (E.OK,),
    "render": (E.OK, E.USAGE, E.ENVIRONMENT),
    "probe": (E.OK, E.UNSUPPORTED, E.ENVIRONMENT),
    "plan": (E.OK, E.CHANGES, E.USAGE, E.UNSUPPORTED, E.ENVIRONMENT),
    "apply": (E.OK, E.USAGE, E.UNSUPPORTED, E.ENVIRONMENT, E.KERNEL, E.AFTER_COMMIT),
    "show": (E.OK, E.USAGE, E.ENVIRONMENT),
    "status": (E.OK, E.CHANGES, E.USAGE, E.UNSUPPORTED, E.ENVIRONMENT),
    "flush": (E.OK, E.USAGE, E.ENVIRONMENT, E.KERNEL),
    "flows": (E.OK, E.USAGE, E.ENVIRONMENT, E.KERNEL),
    "explain": (E.OK, E.CHANGES, E.USAGE, E.ENVIRONMENT),
    "watch": (E.OK, E.USAGE, E.ENVIRONMENT),
    "agent": (E.OK, E.USAGE, E.UNSUPPORTED, E.ENVIRONMENT, E.KERNEL),
    "reload": (E.OK, E.USAGE, E.UNSUPPORTED, E.ENVIRONMENT, E.KERNEL, E.AFTER_COMMIT),
    "reuseport": (E.OK, E.USAGE, E.UNSUPPORTED, E.ENVIRONMENT, E.KERNEL),
    "completion": (E.OK, E.USAGE),
}


def exit_codes_epilog(codes: tuple[ExitCode, ...] = tuple(ExitCode)) -> str:
    """The "Exit codes:" block of a --help (``\b``: click keeps its lines)."""
    import textwrap

    lines = []
    for code in codes:
        first, *rest = textwrap.wrap(EXIT_MEANINGS[code], 66)
        lines += [f"{int(code):>3}  {first}", *(f"     {line}" for line in rest)]
    return "\b\nExit codes:\n" + "\n".join(lines)


app = typer.Typer(
    name="offloadctl",
    help="Kernel-offload control plane: nftables flowtables, reuseport migration.",
    no_args_is_help=True,
    add_completion=False,  # `offloadctl completion bash` prints the script instead
    pretty_exceptions_enable=False,
    # click's plain help, as `git`-style tools print it: wrapped, never cut at
    # the terminal's width, no type column (`<bool>` on every flag).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigArg = Annotated[
    Path,
    typer.Argument(
        help="config file (YAML or JSON; - reads stdin)", show_default=False, metavar="CONFIG"
    ),
]
NetnsOpt = Annotated[
    str | None,
    typer.Option(
        "--netns", help="network namespace name (ip netns)", show_default=False, metavar="NS"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


def load(path: Path) -> Config:
    """The config at ``path`` (``-``: stdin), or ConfigError naming every problem."""
    from controlplane.loader import load_config

    return load_config(path)


def table_name(value: str, flag: str = "--table") -> str:
    """``--table`` parsed by the config's own name parser (ObjName): a bad one is
    a usage error naming the flag and saying why, before anything reaches nft."""
    from controlplane.config import check_objname
    from controlplane.errors import ConfigError, ConfigIssue

    try:
        return check_objname(value)
    except ValueError as exc:
        raise ConfigError([ConfigIssue(flag, str(exc))]) from None


def wants_json(ctx: Any, as_json: bool = False) -> bool:
    """``--json`` given to this command or to a group above it (``flows --json
    teardown`` prints JSON as ``flows teardown --json`` does)."""
    while ctx is not None:
        if as_json or ctx.params.get("as_json"):
            return True
        ctx = ctx.parent
    return as_json


class _Argument(TyperArgument):
    """A positional shown as click shows it: ``CONFIG`` in the usage line (not
    ``{config}``), no ``<path>`` type next to it."""

    def _usage_display_name(self) -> str:
        name = self.make_metavar_name()
        return name if self.required else f"[{name}]"

    def make_metavar_name(self) -> str:
        return self.metavar or (self.name or "ARG").upper()

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def conventional(cmd: Any) -> None:
    """Give every parameter of ``cmd`` (and its subcommands) a real metavar:
    an option without one shows its name in capitals (``--pid PID``), never
    typer's ``<int>``; a positional shows as ``CONFIG``. Idempotent."""
    for param in cmd.params:
        if isinstance(param, TyperArgument) and not isinstance(param, _Argument):
            param.__class__ = _Argument
        elif param.param_type_name == "option" and not param.is_flag and param.metavar is None:
            param.metavar = (param.name or "VALUE").upper()
    # Duck-typed: typer vendors click (typer._click) in some versions, not in others.
    for name, sub in getattr(cmd, "commands", {}).items():
        if name in VERB_EXITS and not sub.epilog:
            sub.epilog = exit_codes_epilog(VERB_EXITS[name])
        conventional(sub)

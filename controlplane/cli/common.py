"""What every command module shares: the typer app, common arguments, config loading.

Kept light: a command module imports this at start-up, so the config models
(pydantic) and the YAML parser are imported only by the commands that load a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from controlplane.config import Config

app = typer.Typer(
    name="offloadctl",
    help="Kernel-offload control plane: nftables flowtables, reuseport migration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[
    Path,
    typer.Argument(help="config file (YAML or JSON; - reads stdin)", show_default=False),
]
NetnsOpt = Annotated[
    str | None,
    typer.Option("--netns", help="network namespace name (ip netns)", show_default=False),
]


def load(path: Path) -> Config:
    """The config at ``path`` (``-``: stdin), or ConfigError naming every problem."""
    from controlplane.loader import load_config

    return load_config(path)

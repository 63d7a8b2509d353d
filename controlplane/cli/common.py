"""What every command module shares: the typer app, common arguments, config loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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


def load(path: Path) -> Config:
    return load_config(path)

"""``offloadctl completion [bash|zsh|fish]``: print the shell completion script.

The Debian package installs its output (bash) as
/usr/share/bash-completion/completions/offloadctl; by hand:
``offloadctl completion bash > ~/.local/share/bash-completion/completions/offloadctl``.
The script calls ``offloadctl`` back with ``_OFFLOADCTL_COMPLETE`` set; ``main()``
then turns typer's completion classes on (``enable``). Kept out of start-up:
only a completion request or this command imports any of it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.cli.common import app
from controlplane.errors import ConfigError, ConfigIssue

SHELLS = ("bash", "zsh", "fish")


def enable() -> None:
    """Register typer's completion classes (what ``add_completion=True`` does at
    every start-up, paid here only when a shell asks)."""
    from typer._completion_classes import completion_init

    completion_init()


def script(shell: str) -> str:
    """The completion script for ``shell``."""
    from controlplane.cli import COMPLETE_VAR

    if shell not in SHELLS:
        raise ConfigError([ConfigIssue("SHELL", f"{shell!r}: use one of {', '.join(SHELLS)}")])
    from typer._completion_shared import get_completion_script

    enable()
    return get_completion_script(prog_name="offloadctl", complete_var=COMPLETE_VAR, shell=shell)


@app.command()
def completion(
    shell: Annotated[
        str, typer.Argument(help="bash, zsh or fish", metavar="SHELL", show_default=False)
    ] = "bash",
) -> None:
    """Print the shell completion script (bash: source it, or install it under
    /usr/share/bash-completion/completions/offloadctl)."""
    from controlplane.cli.errors import handles_errors

    typer.echo(handles_errors(script)(shell))

"""How every ``offloadctl`` command reports failure: one line (plus, for a config,
one line per problem) on stderr and the error class's exit code; never a traceback
unless OFFLOADCTL_DEBUG is set."""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from controlplane.errors import (
    ConfigError,
    ControlPlaneError,
    ExitCode,
    UnreadableConfig,
    one_line,
)

P = ParamSpec("P")
R = TypeVar("R")


def err(message: str) -> None:
    typer.echo(f"offloadctl: {message}", err=True)


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except UnreadableConfig as exc:  # "c.yaml: no such file", not "invalid config"
            err(str(exc.issues[0]))
            raise typer.Exit(exc.exit_code) from None
        except ConfigError as exc:
            if exc.source is None and len(exc.issues) == 1:  # a bad flag, not a file
                err(str(exc.issues[0]))
                raise typer.Exit(exc.exit_code) from None
            src = f"{exc.source}: " if exc.source else ""
            err(f"{src}invalid config ({len(exc.issues)} problem(s))")
            for issue in exc.issues:
                typer.echo(f"  {issue}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except ControlPlaneError as exc:
            err(one_line(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except OSError as exc:
            # Something around us (permissions, a vanished path): still one line.
            err(one_line(exc))
            raise typer.Exit(ExitCode.ENVIRONMENT) from None
        except Exception as exc:
            if os.environ.get("OFFLOADCTL_DEBUG"):
                # The traceback, and still exit 70: a bare re-raise would exit 1,
                # which scripts read as "plan: changes pending".
                traceback.print_exc()
                raise typer.Exit(ExitCode.INTERNAL) from None
            err(f"internal error: {type(exc).__name__}: {exc} (OFFLOADCTL_DEBUG=1 shows more)")
            raise typer.Exit(ExitCode.INTERNAL) from None

    return wrapper

"""``offloadctl``: the command line. Every error is one clear line and an exit code.

Exit codes: 0 ok · 1 ``plan``: changes pending · 2 invalid config or usage ·
3 kernel lacks a feature · 4 environment (root, netns, device, bpffs) ·
5 the kernel refused the transaction (previous state kept).
"""

from __future__ import annotations

import sys
from typing import Any

from controlplane.cli import agent as _agent_cmds  # noqa: F401  (registers agent, reload)
from controlplane.cli import config_cmds, ruleset_cmds  # noqa: F401  (registers commands)
from controlplane.cli.common import app


def _mount_subapps() -> None:
    try:
        from controlplane.cli.reuseport import app as reuseport_app
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

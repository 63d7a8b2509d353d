"""The real ``offloadctl agent`` runs without typer or click: ~5 MB of RSS a
daemon would hold for its whole life (cli/agent_cmd.py; docs/agent.md, *Memory*)."""

from __future__ import annotations

import os
from collections.abc import Callable

from tests.netns.test_agent import AgentProc, agents, make_agent, rundir

__all__ = ["agents", "make_agent", "rundir"]  # fixtures, imported for pytest (router: conftest)

CLI = ("typer", "click")


def test_the_running_agent_has_not_imported_typer_or_click(
    make_agent: Callable[..., AgentProc],
) -> None:
    a = make_agent()
    # Every import the process makes, on its stderr (the agent's log file here).
    a.env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    a.start()  # serving: past its first apply
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in a.log().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "controlplane.agent.daemon" in imported  # the record sees the agent's imports
    cli = sorted(name for name in imported if name.split(".")[0] in CLI)
    assert not cli, cli

"""`offloadctl watch` loads only what the watcher uses (steady-state RSS goal: <= 60 MB)."""

from __future__ import annotations

import subprocess
import sys

# The imports of `offloadctl watch` up to InvalidationService.start()
# (controlplane/cli/flows.py: watch), in a fresh interpreter.
WATCH_PATH = (
    "import sys\n"
    "import controlplane.cli, controlplane.cli.flows\n"
    "from controlplane.config import InvalidationConfig\n"
    "from controlplane.service.invalidation import InvalidationService\n"
    "InvalidationService(None, InvalidationConfig())\n"
    "print(' '.join(sorted(m for m in sys.modules if m.startswith(('pyroute2',"
    " 'controlplane.service.ruleset', 'controlplane.core.plan')))))\n"
)


def test_watch_does_not_import_pyroute2_or_the_ruleset_planner() -> None:
    # pyroute2 costs ~20 MB RSS; the ruleset planner ~0.8 MB; the watcher uses neither.
    res = subprocess.run(
        [sys.executable, "-c", WATCH_PATH], capture_output=True, text=True, check=True
    )
    assert res.stdout == "\n", res.stdout

"""Start-up cost of the CLI that is ours to avoid (issue 7, "Apply speed")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SEED = Path(__file__).resolve().parents[2] / "nft" / "examples" / "seed.yaml"

# Runs `offloadctl validate` in a fresh interpreter and reports every
# importlib.metadata.entry_points() lookup for pydantic plugins.
PROBE = """
import importlib.metadata as md, os, sys
real, asked = md.entry_points, []
def counting(**kw):
    asked.append(kw.get("group"))
    return real(**kw)
md.entry_points = counting
from controlplane.cli import main
try:
    main(["validate", sys.argv[1]])
except SystemExit:
    pass
print("scans", asked.count("pydantic"), "setting", os.environ.get("PYDANTIC_DISABLE_PLUGINS"))
"""


def _probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if env_value is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = env_value
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(SEED)], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_cli_does_not_scan_installed_distributions_for_pydantic_plugins() -> None:
    assert _probe(None) == "scans 0 setting __all__"


def test_an_operators_own_plugin_setting_is_kept() -> None:
    assert _probe("some_plugin") == "scans 1 setting some_plugin"

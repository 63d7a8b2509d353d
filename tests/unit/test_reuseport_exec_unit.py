"""The example unit for ``offloadctl reuseport exec`` says what docs/reuseport-api.md
says and passes ``systemd-analyze verify`` (when systemd is installed)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.core.socket_activation import ListenSpec

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging/systemd/example-reuseport-exec.service"


def service() -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def exec_args() -> list[str]:
    (env,) = shlex.split(service()["Environment"])
    name, _, value = env.partition("=")
    assert name == "EXEC_ARGS"
    return value.split()  # what systemd does with an unquoted $EXEC_ARGS


def test_start_and_reload_run_the_same_generation_command() -> None:
    svc = service()
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "all"  # MAINPID= comes from the next generation
    start = "/usr/bin/offloadctl reuseport exec --reload-signal HUP $EXEC_ARGS"
    assert svc["ExecStart"] == start
    # Reload: SIGHUP, exec forks the next generation (no new interpreter starts).
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["KillMode"] == "mixed"  # SIGTERM to exec, which forwards it


def test_exec_start_takes_the_fast_start_with_the_reload_signal() -> None:
    from controlplane.cli.exec_cmd import parse

    words = service()["ExecStart"].split()
    cut = words.index("$EXEC_ARGS")
    values = parse([*words[3:cut], *exec_args()])
    assert values is not None and values["reload_signal"] == "HUP"


def test_exec_args_parse() -> None:
    args = exec_args()
    cut = args.index("--")
    opts, cmd = args[:cut], args[cut + 1 :]
    listens = [ListenSpec.parse(opts[i + 1]) for i, a in enumerate(opts) if a == "--listen"]
    assert [(s.family, s.port) for s in listens] == [(4, 8080), (6, 8080)]
    assert opts[opts.index("--name") + 1] == "web"
    # gunicorn's control socket (25.1+) is one path per user: two generations would share it.
    assert cmd[0].endswith("gunicorn") and "--no-control-socket" in cmd


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    # verify insists the binaries exist: point it at one that does.
    copy = tmp_path / "web.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/offloadctl", sys.executable))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr

"""uv.lock is what every machine installs (`make setup` runs `uv sync --frozen`), so it must say
what pyproject.toml asks for. Both checks run offline with the uv that the lock itself pins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")
UV_PIN = ROOT / "packaging" / "uv-requirements.txt"


def _uv(*args: str, project: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_OFFLINE": "1", "UV_PYTHON_DOWNLOADS": "never"}
    return subprocess.run(
        [str(UV), *args, "--project", str(project)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _lock_check(project: Path) -> subprocess.CompletedProcess[str]:
    return _uv("lock", "--check", "--offline", project=project)


def test_the_lock_matches_pyproject() -> None:
    result = _lock_check(ROOT)
    assert result.returncode == 0, (
        f"pyproject.toml and uv.lock disagree: run `make lock`\n{result.stderr}"
    )


def test_the_check_fails_when_pyproject_moves_without_the_lock(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    dropped = re.sub(r'(?m)^\s*"gunicorn[^"]*",.*\n', "", text, count=1)
    assert dropped != text  # one dev dependency dropped without touching the lock
    pyproject.write_text(dropped)
    assert _lock_check(tmp_path).returncode != 0


def _requirement_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_the_uv_bootstrap_pin_is_the_locked_uv() -> None:
    # setup.sh installs uv with pip --require-hashes from this file before uv can read the lock.
    result = _uv("export", "--frozen", "--only-group", "uv", "--no-emit-project")
    assert result.returncode == 0, result.stderr
    assert _requirement_lines(UV_PIN.read_text()) == _requirement_lines(result.stdout), (
        f"{UV_PIN.name} is not the uv of uv.lock: run `make lock`"
    )

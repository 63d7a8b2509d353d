"""``offloadctl reuseport exec`` refuses bad input with one line naming the field,
exit 2, before it opens anything (no root needed to see it)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "1.2.3.4:99999", "--", "true"], "--listen: '1.2.3.4:99999': port"),
        (["--listen", "1.2.3.4:\u00b9", "--", "true"], "--listen: '1.2.3.4:\u00b9': port"),
        (
            ["--listen", "127.0.0.1:80", "--stop-signal", "\u00b9", "--", "true"],
            "--stop-signal: '\u00b9' is not a signal",
        ),
        (["--listen", "127.0.0.1:80", "--", "/nonexistent/x"], "CMD: '/nonexistent/x' is not"),
        (
            ["--listen", "127.0.0.1:80", "--stop-signal", "FOO", "--", "true"],
            "--stop-signal: 'FOO' is not a signal",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "reuseport", "exec", "--name", "web", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert res.stderr.startswith(f"offloadctl: {message}")
    assert res.stderr.count("\n") == 1

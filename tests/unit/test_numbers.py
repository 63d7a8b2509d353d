"""Numbers from people and environment variables: ASCII digits only, bounded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from controlplane.agent.health import watchdog_period
from controlplane.core.numbers import ascii_decimal


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("8080", 8080), ("0042", 42), ("9" * 20, int("9" * 20))],
)
def test_ascii_digits_are_numbers(text: str, value: int) -> None:
    assert ascii_decimal(text) == value


@pytest.mark.parametrize(
    "text", ["", "\u00b9", "\u0661", "1\u00b2", "-1", "+1", " 1", "1.0", "9" * 21]
)
def test_anything_else_is_not(text: str) -> None:
    assert ascii_decimal(text) is None


def test_a_watchdog_period_systemd_never_wrote_is_ignored() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "\u00b9"}, pid=1) is None
    assert watchdog_period({"WATCHDOG_USEC": "90000000"}, pid=1) == 45.0


def test_explain_refuses_a_port_that_is_not_ascii_digits() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "explain", "tcp 10.0.0.1:\u00b9 10.0.0.2:80"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (res.returncode, res.stderr.count("\n")) == (2, 1), res.stderr
    assert "Traceback" not in res.stderr

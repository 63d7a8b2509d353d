"""``offloadctl agent``'s typer-free parser (cli/agent_cmd.py, cli/fastparse.py)
reads what click reads, and leaves the rest to click."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.agent.health import STALE_AFTER
from controlplane.cli.agent_cmd import PARAMS, parse

DEFAULTS = {p.dest: p.default for p in PARAMS}


FLAGS = [
    *("--netns", "--state-file", "--socket", "--log-format", "--metrics"),
    *("--metrics-allow-remote", "--no-metrics-allow-remote", "--cleanup-on-exit"),
    *("--watch-interval", "--drift-interval", "--health-stale-after", "-h", "--help"),
    *("--bogus", "--netns=ns1", "--watch-interval=0.1", "--cleanup-on-exit=1", "--", "-"),
    *("--socket=", "--log-format=json", "--sock", "-n"),
]
VALUES = [
    *("c.yaml", "", "-x", "0", "1", "010", "1.5", "1.", ".5", "1e3", " 1", "nan", "inf"),
    *("-1", "1_0", "127.0.0.1:9108", "\u00b9", "\uff11", "plain", "json", "/run/a.sock", "ns1"),
]
PLAIN = [
    *(["--netns", "ns1"], ["--state-file", "s.json"], ["--socket=/run/a.sock"]),
    *(["--log-format", "json"], ["--metrics", "127.0.0.1:9108"], ["--metrics-allow-remote"]),
    *(["--cleanup-on-exit"], ["--watch-interval", "0.5"], ["--drift-interval=0"]),
    ["--health-stale-after", "3"],
]
TOKENS = st.sampled_from(FLAGS + VALUES)
# Mostly argument lists that could run (CONFIG among the options), with odd tokens.
ARGVS = st.builds(
    lambda opts, config, more: [*(t for o in opts for t in o), *config, *more],
    st.lists(
        st.one_of(st.sampled_from(PLAIN), st.lists(TOKENS, min_size=1, max_size=2)), max_size=6
    ),
    st.sampled_from([["c.yaml"], ["--", "c.yaml"], ["-"], []]),
    st.lists(TOKENS, max_size=3),
)


def _click_params(argv: list[str]) -> dict[str, Any]:
    import typer

    from controlplane.cli import _import_area
    from controlplane.cli.common import app

    _import_area("agent")
    root: Any = typer.main.get_command(app)
    ctx = root.make_context("offloadctl", ["agent"], resilient_parsing=True)
    cmd = root.get_command(ctx, "agent")
    return dict(cmd.make_context("agent", list(argv), parent=ctx).params)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


@settings(max_examples=500)
@given(argv=ARGVS)
def test_what_the_fast_parser_takes_click_parses_the_same(argv: list[str]) -> None:
    fast = parse(argv)
    if fast is None:
        return  # left to click
    assert _plain(_click_params(argv)) == _plain(fast)


def test_the_fast_parser_takes_the_plain_spellings() -> None:
    got = parse(
        [
            *("--netns", "ns1", "c.yaml", "--socket=/run/a.sock", "--metrics-allow-remote"),
            *("--watch-interval", "0.5", "--health-stale-after=7", "--log-format", "json"),
        ]
    )
    assert got == {
        **DEFAULTS,
        "config": Path("c.yaml"),  # options before and after CONFIG, as click takes them
        "netns": "ns1",
        "socket_path": Path("/run/a.sock"),
        "metrics_allow_remote": True,
        "watch_interval": 0.5,
        "health_stale_after": 7.0,
        "log_format": "json",
    }
    assert parse(["--", "-"]) == {**DEFAULTS, "config": Path("-")}
    assert DEFAULTS["health_stale_after"] == STALE_AFTER


@pytest.mark.parametrize(
    "argv",
    [
        [],  # CONFIG missing
        ["a.yaml", "b.yaml"],  # an extra argument
        ["c.yaml", "--watch-interval", "-1"],  # a negative number: click's reading
        ["c.yaml", "--help"],
        ["c.yaml", "--cleanup-on-exit=yes"],
        ["c.yaml", "--sock", "/x"],  # no abbreviations
    ],
)
def test_what_the_fast_parser_leaves_to_click(argv: list[str]) -> None:
    assert parse(argv) is None


def test_a_usage_error_is_clicks() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "agent", "a.yaml", "b.yaml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert "Got unexpected extra argument(s) (b.yaml)" in res.stderr

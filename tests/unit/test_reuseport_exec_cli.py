"""``offloadctl reuseport exec`` refuses bad input with one line naming the field,
exit 2, before it opens anything (no root needed to see it)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


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


# --- the fast start (cli/exec_cmd.py) ----------------------------------------------

HEAVY = ("typer", "click", "pydantic", "pydantic_core", "rich", "yaml", "pyroute2")

# main() up to the point where exec would open its group: the stand-in for
# reuseport_exec.run records what is imported by then, and the options.
FAST_PROBE = """
import os, sys
import controlplane.agent.reuseport_exec as rx
def run(opts, on_active=None):
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))
    print("heavy", *heavy)
    print("argv", *opts.argv, "backlog", opts.backlog, "ready_after", opts.ready_after)
    print("CMD's PYDANTIC_DISABLE_PLUGINS:", os.environ.get("PYDANTIC_DISABLE_PLUGINS"))
    return 0
rx.run = run
from controlplane.cli import main
main(sys.argv[2:])
"""


def _fast_probe(*args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    res = subprocess.run(
        [sys.executable, "-c", FAST_PROBE, ",".join(HEAVY), "reuseport", "exec", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    # offloadctl's own pydantic setting (cli.main) is not passed on to the server.
    assert res.stdout.splitlines()[2] == "CMD's PYDANTIC_DISABLE_PLUGINS: None", res.stdout
    return res.stdout.splitlines()


def test_exec_starts_without_typer_or_pydantic() -> None:
    # The example unit's arguments (packaging/systemd/example-reuseport-exec.service).
    from tests.unit.test_reuseport_exec_unit import exec_args

    args = exec_args()
    out = _fast_probe("--ready-after", "2.5", "--backlog=128", *args)
    assert out[0] == "heavy", out  # nothing heavy imported
    cmd = args[args.index("--") + 1 :]
    assert out[1] == " ".join(["argv", *cmd, "backlog", "128", "ready_after", "2.5"])


def test_what_the_fast_parser_leaves_to_click_gets_click() -> None:
    # -nweb: a spelling the fast parser leaves to the typer command, which runs
    # exec the same way (and imports typer to parse it).
    out = _fast_probe("-nweb", "--listen", "127.0.0.1:80", "--", "true")
    assert "typer" in out[0].split(), out
    assert out[1] == "argv true backlog 4096 ready_after None"


def _click_exec() -> Any:
    import typer

    from controlplane.cli.common import app

    root: Any = typer.main.get_command(app)
    ctx = root.make_context("offloadctl", ["reuseport"], resilient_parsing=True)
    group = root.get_command(ctx, "reuseport")
    return ctx, group.get_command(ctx, "exec")


FLAGS = [
    *("--name", "-n", "--listen", "-l", "--ready-after", "--ready-timeout", "--stop-signal"),
    *("--stop-timeout", "--backlog", "--detach", "--no-detach", "--netns", "--bpffs", "-h"),
    *("--help", "--bogus", "-nweb", "-n=web", "--name=web", "--backlog=0", "--detach=1", "--"),
    *("--ready-after=1.5", "--listen=", "-"),
]
VALUES = [
    *("web", "", "-x", "0", "1", "010", "1.5", "1.", ".5", "1e3", " 1", "nan", "inf", "-1"),
    *("1_0", "127.0.0.1:80", "[::1]:80", "\u00b9", "\uff11", "TERM", "9", "true", "/bin/true"),
]


TOKENS = st.sampled_from(FLAGS + VALUES)
# Mostly argument lists that could run (name, listen, CMD), with odd tokens among them.
ARGVS = st.builds(
    lambda required, opts, sep, cmd: [*required, *(t for o in opts for t in o), *sep, *cmd],
    st.sampled_from([["--name", "web", "--listen", "127.0.0.1:80"], ["-l", "[::1]:80"], []]),
    st.lists(st.lists(TOKENS, min_size=1, max_size=2), max_size=6),
    st.sampled_from([["--"], []]),
    st.lists(TOKENS, max_size=3),
)


@settings(max_examples=500)
@given(argv=ARGVS, bpffs_env=st.sampled_from([None, "", "/env/bpffs"]))
def test_what_the_fast_parser_takes_click_parses_the_same(
    argv: list[str], bpffs_env: str | None
) -> None:
    from controlplane.cli.exec_cmd import parse

    with pytest.MonkeyPatch.context() as mp:
        if bpffs_env is None:
            mp.delenv("OFFLOADCTL_BPFFS", raising=False)
        else:
            mp.setenv("OFFLOADCTL_BPFFS", bpffs_env)
        fast = parse(argv)
        if fast is None:
            return  # left to click
        parent, cmd = _click_exec()
        params = cmd.make_context("exec", list(argv), parent=parent).params
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()} == fast


def test_the_fast_parser_takes_the_plain_spellings() -> None:
    from controlplane.cli.exec_cmd import parse

    got = parse(
        [
            *("-n", "web", "--listen", "a=127.0.0.1:80", "-l", "[::1]:80", "--ready-timeout=5"),
            *("--backlog", "16", "--detach", "--netns", "ns1", "--bpffs=/b"),
            *("--reload-signal", "HUP", "srv", "--x", "--"),
        ]
    )
    assert got == {
        "name": "web",
        "listen": ["a=127.0.0.1:80", "[::1]:80"],
        "cmd": ["srv", "--x", "--"],  # options end at CMD's first word
        "ready_after": None,
        "ready_timeout": 5.0,
        "stop_signal": "TERM",
        "stop_timeout": 90.0,
        "reload_signal": "HUP",
        "backlog": 16,
        "detach": True,
        "netns": "ns1",
        "bpffs": "/b",
    }

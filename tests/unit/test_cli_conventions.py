"""Command-line conventions of click/typer tools (issue 14): every verb takes -h,
shows real metavars and help for every option, and its exit codes agree with
ExitCode, --help and README.md's tables."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

import controlplane.cli as cli
from controlplane.cli.common import VERB_EXITS, app, table_name
from controlplane.errors import EXIT_MEANINGS, ConfigError, ExitCode

README = Path(__file__).resolve().parents[2] / "README.md"
TYPER_METAVAR = re.compile(r"<(bool|str|int|float|path|text|file)>")


def _root() -> Any:
    group: Any = typer.main.get_command(app)
    ctx = group.make_context("offloadctl", ["--help"], resilient_parsing=True)
    group.list_commands(ctx)  # imports every area and applies the conventions
    return group


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield (*path, name), sub
        yield from _commands(sub, (*path, name))


ROOT = _root()
COMMANDS = list(_commands(ROOT))
IDS = [" ".join(p) for p, _ in COMMANDS]


def _help(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        capture_output=True,
        text=True,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_every_option_has_help_and_a_real_metavar(path: tuple[str, ...], cmd: Any) -> None:
    for param in cmd.params:
        if param.param_type_name == "option":
            assert param.help, f"{' '.join(path)} {param.opts}: no help text"
            shown = param.get_help_record(cmd.context_class(cmd))[0]
            assert not TYPER_METAVAR.search(shown), f"{' '.join(path)}: typer metavar {shown!r}"
            assert "/--no-" not in shown, f"{' '.join(path)}: a flag with a --no- twin: {shown!r}"
        else:  # an argument: CONFIG, not {config}
            assert param.metavar or param.name.upper(), path


@pytest.mark.parametrize("verb", ["apply", "agent", "flows", "reuseport", "completion"])
def test_dash_h_and_usage_show_click_conventions(verb: str) -> None:
    res = _help(verb, "-h")
    assert res.returncode == 0, res.stderr
    usage = res.stdout.splitlines()[0]
    assert "{" not in usage and not TYPER_METAVAR.search(res.stdout), res.stdout
    if verb in ("apply", "agent"):
        assert usage.endswith("[OPTIONS] CONFIG"), usage


def test_agent_help_is_not_cut_at_80_columns() -> None:
    out = _help("agent", "--help").stdout
    assert "…" not in out
    for option in ("--metrics-allow-remote", "--cleanup-on-exit", "--drift-interval SECONDS"):
        assert option in out, out
    # the whole default, wrapped where it must be, never cut
    assert "/var/lib/offloadctl/<netns or host>/state.json" in " ".join(out.split())


def test_reuseport_adopt_names_the_fd_asked_for() -> None:
    # fd 0 of this process is /dev/null (not a socket); taking it lands on another fd
    # number here, and the error must name the one the user gave.
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os,sys\n"
            "from controlplane.cli.reuseport import listener_error\n"
            "fd = os.dup(0)\n"
            "print(listener_error(fd, 0, 4242))\n",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    )
    assert res.stdout.strip() == "fd 0 of pid 4242 is not a socket", res.stdout


def _readme_table(header: str) -> list[list[str]]:
    text = README.read_text()
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_readme_exit_code_table_is_exit_code() -> None:
    rows = _readme_table("| code | meaning |")
    assert {int(code): meaning for code, meaning in rows} == {
        int(c): m for c, m in EXIT_MEANINGS.items()
    }
    assert set(EXIT_MEANINGS) == set(ExitCode)


def test_readme_verb_table_matches_every_verb_and_its_help() -> None:
    rows = {verb: codes.split() for verb, codes in _readme_table("| verb | exit codes")}
    verbs = {p[0] for p, _ in COMMANDS}
    assert set(rows) == verbs == set(VERB_EXITS), (set(rows) ^ verbs, set(VERB_EXITS) ^ verbs)
    assert set(cli.COMMANDS) == verbs
    for verb, codes in rows.items():
        assert [int(c) for c in codes] == [int(c) for c in VERB_EXITS[verb]], verb
        epilog = ROOT.commands[verb].epilog
        listed = [int(m) for m in re.findall(r"^\s*(\d+)  ", epilog, re.M)]
        assert listed == [int(c) for c in VERB_EXITS[verb]], (verb, epilog)


def test_root_help_lists_every_exit_code() -> None:
    out = _help("-h").stdout
    for code, meaning in EXIT_MEANINGS.items():
        assert re.search(rf"^\s+{int(code)}  {re.escape(meaning.split()[0])}", out, re.M), code


def test_completion_script_and_completions() -> None:
    script = _help("completion", "bash").stdout
    assert "complete -o default -F _offloadctl_completion offloadctl" in script
    assert cli.COMPLETE_VAR in script
    res = subprocess.run(
        [sys.executable, "-m", "controlplane.cli"],
        env={
            cli.COMPLETE_VAR: "complete_bash",
            "COMP_WORDS": "offloadctl app",
            "COMP_CWORD": "1",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.stdout.split() == ["apply"], res
    bad = _help("completion", "tcsh")
    assert bad.returncode == ExitCode.USAGE and "use one of bash, zsh, fish" in bad.stderr


def test_base_error_is_not_changes_pending() -> None:
    from controlplane.errors import ControlPlaneError

    # 1 means "plan: changes pending" to a script: an unclassified error is a bug.
    assert int(ControlPlaneError().exit_code) == int(ExitCode.INTERNAL) == 70


def test_json_wherever_the_readme_promises_it() -> None:
    text = README.read_text()
    usage = text[text.index("## Using it") : text.index("## Config")]
    promised = [
        line.split()[1:3] for line in usage.splitlines() if line.startswith("offloadctl ")
        if "--json" in line.split("#")[0]
    ]  # fmt: skip
    assert len(promised) >= 5, promised
    for words in promised:
        cmd = ROOT.commands[words[0]]
        if len(words) > 1 and words[1] in getattr(cmd, "commands", {}):
            cmd = cmd.commands[words[1]]
        opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
        assert "--json" in opts, words
        help_of = next(p.help for p in cmd.params if "--json" in getattr(p, "opts", ()))
        assert help_of, words


def test_wants_json_sees_a_groups_json_flag() -> None:
    """`flows --json teardown`: the group's --json reaches its subcommand."""
    from types import SimpleNamespace

    from controlplane.cli.common import wants_json

    group = SimpleNamespace(params={"as_json": True}, parent=None)
    sub = SimpleNamespace(params={}, parent=group)
    assert wants_json(sub) is True
    assert wants_json(SimpleNamespace(params={}, parent=None)) is False
    assert wants_json(SimpleNamespace(params={}, parent=None), as_json=True) is True


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a;b", "start with a letter, then up to 62 of"),
        ("1abc", "start with a letter, then up to 62 of"),
        ("table", "is an nft keyword"),
    ],
)
def test_table_flag_is_parsed_by_the_configs_name_parser(value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        table_name(value)
    assert info.value.exit_code == ExitCode.USAGE
    [issue] = info.value.issues
    assert issue.path == "--table" and reason in issue.message and repr(value) in issue.message


def test_table_flag_keeps_a_valid_name() -> None:
    assert table_name("offloadctl") == "offloadctl"

"""The loader: every bad input is one ConfigError (exit 2) naming the field and line.

Table-driven like h11's SIMPLE_CASES: each row is a file's text and what the
loader must say about it. The CLI rows at the end run the real command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NoReturn

import pytest

from controlplane import loader
from controlplane.errors import ConfigError
from controlplane.loader import load_config, load_text

ROOT = Path(__file__).parents[2]
SEED = ROOT / "nft" / "examples" / "seed.yaml"

DNAT = "version: 1\nnat:\n  dnat:\n    - iifname: wan0\n      to: 10.0.0.1\n"
ANY_WORDING = ""  # the parser's own message, whatever it says


def _alias_bomb(levels: int, fanout: int = 10) -> str:
    lines = ["version: 1", "a0: &a0 [" + ", ".join(["10.0.0.0/8"] * fanout) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + "\n"


# (name, text, json?, expected path, expected line or None, words in the message)
BAD: list[tuple[str, str, bool, str, int | None, str]] = [
    ("dup-top", "version: 1\nnat: {}\nnat: {guard: false}\n", False, "nat", 3, "duplicate key"),
    ("dup-deep", DNAT + "      port: 80\n      port: 81\n", False, "nat.dnat[0].port", 7, "line 6"),
    (
        "dup-json",
        '{"version": 1,\n "nat": {"guard": true,\n "guard": false}}',
        True,
        "nat.guard",
        3,
        "duplicate key",
    ),
    ("dup-json-top", '{"version": 1, "version": 1}', True, "version", 1, "duplicate"),
    ("version-true", "version: true\n", False, "version", 1, "integer 1"),
    ("version-float", "version: 1.0\n", False, "version", 1, "integer 1"),
    ("version-true-json", '{"version": true}', True, "version", 1, "integer 1"),
    ("version-string", "version: '1'\n", False, "version", 1, "integer 1"),
    ("sexagesimal", DNAT + "      port: 1:20\n", False, "nat.dnat[0].port", 6, "'1:20'"),
    ("yes-is-a-string", "version: 1\nnat:\n  guard: yes\n", False, "nat.guard", 3, "'yes'"),
    ("on-is-a-string", "version: 1\nnat:\n  guard: on\n", False, "nat.guard", 3, "'on'"),
    (
        "timestamp-is-a-string",
        "version: 1\ntable: {name: 2001-01-01}\n",
        False,
        "table.name",
        2,
        "invalid name",
    ),
    (
        "octal-is-decimal",
        DNAT + "      port: 010\n      to_port: 0o10\n",
        False,
        "(file)",
        None,
        "NOT AN ERROR",
    ),
    (
        "zone-prefix",
        "version: 1\nnat:\n  masquerade:\n    - oifname: wan0\n      saddr: ['fe80::%wan0/64']\n",
        False,
        "nat.masquerade[0].saddr[0]",
        5,
        "zone id",
    ),
    (
        "zone-address",
        "version: 1\nnat:\n  snat: [{oifname: wan0, to: 'fe80::1%wan0'}]\n",
        False,
        "nat.snat[0].to",
        3,
        "zone id",
    ),
    (
        "deep-flow",
        "version: 1\nx: " + "[" * 100 + "]" * 100 + "\n",
        False,
        "(file)",
        2,
        "nested deeper than 64",
    ),
    (
        # Which limit stops this first is the parser's business: libyaml >= 0.2.6 (PyYAML
        # 6.0.4's wheels) scans a flow collection ahead and refuses 1,000 levels with its own
        # message before our check sees level 64; older ones leave it to ours. Either way: one
        # problem, for the file, on line 2.
        "deep-yaml",
        "version: 1\nx: " + "[" * 100_000 + "]" * 100_000 + "\n",
        False,
        "(file)",
        2,
        ANY_WORDING,
    ),
    (
        "deep-block",
        "version: 1\nx:\n" + "".join(f"{' ' * i}- \n" for i in range(100)),
        False,
        "(file)",
        66,
        "nested deeper",
    ),
    (
        "deep-json",
        '{"version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        True,
        "(file)",
        None,
        "nested",
    ),
    ("alias-bomb", _alias_bomb(7), False, "(file)", None, "after expanding aliases"),
    (
        "deep-json-900",
        '{"version": 1, "x": ' + "[" * 900 + "]" * 900 + "}",
        True,
        "(file)",
        None,
        "nested deeper than 64",
    ),
    ("huge-int", "version: " + "9" * 5000 + "\n", False, "(file)", None, "4,300 digits"),
    ("huge-int-json", '{"version": ' + "9" * 5000 + "}", True, "(file)", None, "4,300 digits"),
    ("unknown-alias", "version: 1\nx: *nope\n", False, "(file)", 2, "unknown alias"),
    (
        "python-tag",
        "version: 1\nx: !!python/name:os.system ''\n",
        False,
        "(file)",
        2,
        "unsupported tag",
    ),
    ("binary-tag", "version: 1\nx: !!binary aGk=\n", False, "(file)", 2, "unsupported tag"),
    ("bad-int-tag", "version: !!int one\n", False, "(file)", 1, "not a valid !!int"),
    ("non-string-key", "version: 1\n1: x\n", False, "(top level)", 2, "keys must be strings"),
    ("complex-key", "version: 1\n? [a]\n: x\n", False, "(top level)", 2, "keys must be strings"),
    ("two-documents", "version: 1\n---\nversion: 1\n", False, "(file)", 2, "more than one"),
    ("broken-yaml", "version: 1\nflowtables: [\n", False, "(file)", 3, "invalid YAML"),
    ("broken-json", '{"version": 1,', True, "(file)", 1, "invalid JSON"),
    ("tab-indent", "version: 1\nnat:\n\tguard: true\n", False, "(file)", 3, "invalid YAML"),
    ("not-a-mapping", "- version: 1\n", False, "(top level)", None, "mapping"),
    ("empty", "", False, "(top level)", None, "mapping"),
    (
        "merge-key-is-not-special",
        "version: 1\nbase: &b {guard: true}\nnat:\n  <<: *b\n",
        False,
        "base",
        2,
        "unknown key",
    ),
]


@pytest.mark.parametrize(
    ("text", "as_json", "path", "line", "words"),
    [row[1:] for row in BAD],
    ids=[row[0] for row in BAD],
)
def test_bad_input_names_the_field_and_line(
    text: str, as_json: bool, path: str, line: int | None, words: str
) -> None:
    if words == "NOT AN ERROR":
        cfg = load_text(text, "t.yaml")
        # YAML 1.2 core schema: 010 is ten (1.1 read eight), 0o10 is eight
        assert (cfg.nat.dnat[0].port, cfg.nat.dnat[0].to_port) == (10, 8)
        return
    with pytest.raises(ConfigError) as info:
        load_text(text, "t", json_syntax=as_json)
    issues = {i.path: i for i in info.value.issues}
    assert path in issues, [str(i) for i in info.value.issues]
    if words == ANY_WORDING:  # only the place and the count are ours to promise
        assert len(info.value.issues) == 1, [str(i) for i in info.value.issues]
    assert issues[path].message and words.lower() in issues[path].message.lower(), str(issues[path])
    assert issues[path].line == line, str(issues[path])


def test_core_schema_scalars() -> None:
    text = textwrap.dedent(
        """\
        a: [1:20, yes, no, on, off, 010, 0o10, 0x1F, 1e3, .inf, ~, null, "", 2001-01-01]
        b: [true, False, 'true', 12, +12, -3, 1.5]
        """
    )
    data, lines = loader._compose_yaml(text)
    assert data["a"] == [
        "1:20",
        "yes",
        "no",
        "on",
        "off",
        10,
        8,
        31,
        1000.0,
        float("inf"),
        None,
        None,
        "",
        "2001-01-01",
    ]
    assert data["b"] == [True, False, "true", 12, 12, -3, 1.5]
    assert lines is not None and lines.find(("b", 3)) == 2


def test_aliases_within_bounds_are_kept() -> None:
    text = (
        "version: 1\nflowtables:\n  - {name: a, devices: &d [eth0, eth1]}\n"
        "  - {name: b, bridges: *d}\n"
    )
    cfg = load_text(text)
    assert cfg.flowtables[1].bridges == ["eth0", "eth1"]
    # aliases share the anchored value: ~111,000 values from 40 aliases pass
    data, _ = loader._compose_yaml(_alias_bomb(5))
    assert data["a4"][0][0][0][0] is data["a0"]


def test_alias_bound_is_the_expanded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_VALUES", 2_000)
    loader._compose_yaml(_alias_bomb(3))  # ~1,100 values
    with pytest.raises(loader._YamlProblem, match="after expanding aliases"):
        loader._compose_yaml(_alias_bomb(4))  # ~11,000 values from 40 aliases


def test_size_bound(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n" + "#" * loader.MAX_BYTES)
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_config(big)


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(b"version: 1\nx: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(f)


@pytest.mark.parametrize(
    ("name", "raw", "line"),
    [
        ("c.yaml", b"version: 1\nnat:\n  masq\x00uerade: []\n", 3),
        ("c.json", b'{"version": 1,\n "x": "a\x00b"}', 2),
        ("c.yaml", b"version: 1\n\x1b[31m: x\n", 2),
        ("c.yaml", "version: 1\nx: \u0085\u0080\n".encode(), 2),
    ],
)
def test_control_characters_are_one_issue_with_a_line(
    tmp_path: Path, name: str, raw: bytes, line: int
) -> None:
    """Issue 15: a NUL byte gave a two-line parser message without a line number."""
    f = tmp_path / name
    f.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    [issue] = info.value.issues
    assert issue.line == line and "control character" in issue.message
    assert "\n" not in str(issue)


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir])
def test_only_regular_files_are_read(tmp_path: Path, make: object) -> None:
    """Issue 15 (F7): ``validate`` of a FIFO hung in open()."""
    f = tmp_path / "c.yaml"
    make(f)  # type: ignore[operator]
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(f)


def test_many_problems_are_capped() -> None:
    text = "version: 1\nflowtables:\n" + "".join(
        f"  - {{name: f{i}, devices: ['a b']}}\n" for i in range(200)
    )
    with pytest.raises(ConfigError) as info:
        load_text(text)
    assert len(info.value.issues) == loader.MAX_ISSUES + 1
    assert "150 more" in info.value.issues[-1].message


def test_json_errors_carry_lines(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text('{"version": 1,\n "flowtables": [\n  {"name": "ft", "devices": ["a b"]}]}')
    with pytest.raises(ConfigError) as info:
        load_config(f)
    (issue,) = info.value.issues
    assert (issue.path, issue.line) == ("flowtables[0].devices[0]", 3)


def test_yaml_and_json_agree_and_examples_load_in_one_pass() -> None:
    import json

    import yaml

    for example in sorted((ROOT / "nft" / "examples").glob("*.yaml")):
        data = yaml.safe_load(example.read_text())
        assert load_text(json.dumps(data), json_syntax=True) == load_config(example)
        assert loader._compose_yaml(example.read_text())[0] == data


# -- the command as users run it ----------------------------------------------


def _cli(*args: str, stdin: str | bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OFFLOADCTL_DEBUG": ""}
    data = stdin.decode() if isinstance(stdin, bytes) else stdin
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        input=data,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_reads_stdin() -> None:
    res = _cli("validate", "-", stdin=SEED.read_text())
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("<stdin>: ok (1 flowtable(s)")
    res = _cli("render", "-", "--format", "nft", stdin=SEED.read_text())
    assert res.returncode == 0, res.stderr
    assert "flowtable" in res.stdout
    res = _cli("validate", "-", stdin="version: 1\nversion: 1\n")
    assert res.returncode == 2
    assert "<stdin>: invalid config" in res.stderr and "duplicate key 'version'" in res.stderr


def test_cli_parser_failures_exit_2_with_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("version: 1\nx: " + "[" * 200_000 + "]" * 200_000 + "\n")
    # whatever the parser says about it: exit 2, the file named, one problem with its line
    assert _one_problem(_cli("validate", str(deep)), deep).startswith("(file) (line 2): ")
    deepj = tmp_path / "deep.json"
    deepj.write_text("[" * 200_000 + "]" * 200_000)
    assert _one_problem(_cli("validate", str(deepj)), deepj).startswith("(file)")


def _one_problem(res: subprocess.CompletedProcess[str], path: Path) -> str:
    """The one problem line of a CLI run that exited 2 naming ``path``, without a traceback."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    head, *problems = res.stderr.splitlines()
    assert head == f"offloadctl: {path}: invalid config (1 problem(s))", res.stderr
    assert len(problems) == 1, res.stderr
    return problems[0].strip()


def test_cli_version() -> None:
    from importlib.metadata import version

    res = _cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"offloadctl {version('controlplane')}\n"


def test_cli_imports_only_what_validate_needs() -> None:
    # start-up time: validate must not import BPF, netlink or libnftables code
    code = (
        "import sys\nfrom controlplane.cli import main\n"
        "try:\n    main(['validate', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('controlplane'))))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(SEED)], capture_output=True, text=True, check=True
    )
    loaded = set(res.stdout.split())
    assert "controlplane.config" in loaded
    heavy = {m for m in loaded if m.startswith(("controlplane.kernel", "controlplane.cli.ruleset"))}
    assert not heavy, heavy
    # the match table checks the policies; the nft model it renders with waits
    assert "controlplane.core.matches" in loaded and "controlplane.core.nft" not in loaded


def test_only_one_shot_commands_run_without_the_cycle_collector() -> None:
    # main() turns the cyclic GC off for start-up speed; a long-running command
    # (agent, watch, flows) must get it back before its module is even imported.
    code = (
        "import gc, sys\nfrom controlplane import cli\nseen = {}\norig = cli._import_area\n"
        "def spy(m):\n    seen[m] = gc.isenabled()\n    return orig(m)\n"
        "cli._import_area = spy\n"
        "for argv in (['apply', '--help'], ['flows', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print(seen['ruleset_cmds'], seen['flows'], gc.isenabled(), file=sys.stderr)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stderr.split() == ["False", "True", "True"], res.stderr


# -- whose fault: only the input's problems are "invalid config" (exit 2) -----------


def _bug(*args: object, **kwargs: object) -> NoReturn:
    raise KeyError("a bug of ours")


@pytest.mark.parametrize("as_json", [False, True], ids=["yaml", "json"])
def test_a_bug_while_parsing_is_not_blamed_on_the_config(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    monkeypatch.setattr(loader, "_json_depth_ok" if as_json else "_compose_yaml", _bug)
    with pytest.raises(KeyError, match="a bug of ours"):
        load_text('{"version": 1}', "t", json_syntax=as_json)


def test_a_bug_finding_json_lines_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # lines are looked up only to report a problem: a duplicate key is one
    monkeypatch.setattr(loader, "_compose_yaml", _bug)
    with pytest.raises(KeyError, match="a bug of ours"):
        load_text('{"version": 1, "flowtables": [{"name": "a b"}]}', "t", json_syntax=True)


_BUGGY_VALIDATE = (
    "import sys\nfrom controlplane import loader\n"
    "def bug(text):\n    raise KeyError('a bug of ours')\n"
    "loader._compose_yaml = bug\n"
    "from controlplane.cli import main\nmain(['validate', sys.argv[1]])\n"
)


@pytest.mark.parametrize("debug", ["", "1"], ids=["plain", "debug"])
def test_cli_a_bug_while_parsing_exits_70_not_2(debug: str) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _BUGGY_VALIDATE, str(SEED)],
        capture_output=True,
        text=True,
        env={**os.environ, "OFFLOADCTL_DEBUG": debug},
        timeout=60,
        check=False,
    )
    assert "invalid config" not in res.stderr, res.stderr
    if debug:  # the traceback, for whoever fixes it
        assert "Traceback" in res.stderr and "KeyError: 'a bug of ours'" in res.stderr, res.stderr
    else:
        assert res.stderr == (
            "offloadctl: internal error: KeyError: 'a bug of ours'"
            " (OFFLOADCTL_DEBUG=1 shows more)\n"
        )
    assert res.returncode == 70, res.stderr  # debug too: 1 would read as "changes pending"

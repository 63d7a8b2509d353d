"""The man page ``offloadctl(8)`` and the bash completion, generated from the CLI itself.

Both walk the same click command tree ``offloadctl --help`` prints, so a new
verb or option appears in them without anyone editing a copy. The Debian
package build runs this against the packaged CLI::

    python -m controlplane.cli.docgen man  > offloadctl.8
    python -m controlplane.cli.docgen bash > offloadctl   # bash-completion file

Exit codes come from ``controlplane.errors`` (``EXIT_MEANINGS``, the error
classes), so the man page's EXIT STATUS and the systemd units'
``RestartPreventExitStatus=`` (checked by a unit test) read the numbers and
words the CLI exits and ``--help`` speaks with.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from controlplane import __version__
from controlplane.errors import (
    EXIT_MEANINGS,
    ConfigError,
    EnvironmentProblem,
    ExitCode,
    UnsupportedError,
)

PROG = "offloadctl"

# Exit status -> meaning, in the words of --help and the README (one table: errors.EXIT_MEANINGS).
EXIT_STATUS: tuple[tuple[int, str], ...] = tuple((int(c), m) for c, m in EXIT_MEANINGS.items())
# Exits a restart cannot cure: a unit must not retry them (RestartPreventExitStatus=).
PERMANENT_EXITS = (ConfigError.exit_code, UnsupportedError.exit_code, EnvironmentProblem.exit_code)

FILES = (
    ("/etc/offloadctl/agent.yaml", "config of the host's agent (offloadctl.service)"),
    ("/etc/offloadctl/NS.yaml", "config of the agent for network namespace NS (offloadctl@NS)"),
    ("/run/offloadctl/", "control sockets (host.sock, NS.sock) and per-namespace locks"),
    ("/var/lib/offloadctl/", "the agent's state (what it owns), one directory per namespace"),
    ("/usr/share/doc/offloadctl/examples/", "example configs: router, hypervisor, service host"),
)
SEE_ALSO = (("nft", 8), ("conntrack", 8), ("ip-netns", 8), ("bridge", 8), ("systemd.service", 5))


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]  # every spelling, --no-x included
    record: tuple[str, str]  # (what --help shows left, what it shows right)
    takes_value: bool
    value_kind: str  # "netns", "path" or "" (anything else)


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # () for the root
    help: str
    usage: str
    arguments: tuple[tuple[str, str], ...]
    options: tuple[Option, ...]
    subcommands: tuple[str, ...]


def command_tree() -> list[Command]:
    """Every command of ``offloadctl``, the root first, depth-first in --help order."""
    import typer

    # (importing cli.common runs cli/__init__, which makes app's group lazy-loading)
    from controlplane.cli.common import app

    root = typer.main.get_command(app)
    ctx = root.make_context(PROG, [], resilient_parsing=True)
    return list(_walk(root, ctx, ()))


def _walk(cmd: Any, ctx: Any, path: tuple[str, ...]) -> Iterator[Command]:
    subs: list[str] = []
    if hasattr(cmd, "list_commands"):
        subs = [n for n in cmd.list_commands(ctx) if not cmd.get_command(ctx, n).hidden]
    arguments: list[tuple[str, str]] = []
    options: list[Option] = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        record = p.get_help_record(ctx)
        if p.param_type_name == "argument":
            name = record[0].split()[0] if record else p.name
            arguments.append((name, record[1] if record else ""))
            continue
        left = record[0] if record else " / ".join(p.opts)
        kind = "netns" if p.name == "netns" else "path" if "<path>" in left else ""
        options.append(
            Option(
                tuple(p.opts) + tuple(p.secondary_opts),
                (left, record[1] if record else ""),
                takes_value=not p.is_flag,
                value_kind=kind,
            )
        )
    options.append(Option(("--help",), ("--help", "show the command's help and exit"), False, ""))
    pieces = " ".join(cmd.collect_usage_pieces(ctx))
    yield Command(
        path,
        (cmd.help or "").strip(),
        " ".join((PROG, *path, pieces)),
        tuple(arguments),
        tuple(options),
        tuple(subs),
    )
    for name in subs:
        sub = cmd.get_command(ctx, name)
        yield from _walk(
            sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True), (*path, name)
        )


# -- man page ------------------------------------------------------------------


def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no leading control char."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + out if out.startswith((".", "'")) else out


def _paragraphs(text: str) -> list[str]:
    """Help text as paragraphs; typer's \\b (keep as is) markers dropped."""
    paras = [" ".join(p.replace("\b", "").split()) for p in text.split("\n\n")]
    return [p for p in paras if p]


def man_page(tree: list[Command]) -> str:
    root = tree[0]
    title = _paragraphs(root.help)[0] if root.help else "kernel-offload control plane"
    lines = [
        f'.TH OFFLOADCTL 8 "" "{PROG} {__version__}" "System Administration"',
        ".SH NAME",
        f"{PROG} \\- {_roff(title[0].lower() + title[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
        f".B {PROG}",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        _roff(
            f"{PROG} renders a declarative config into one nftables table it owns and applies"
            " it as one transaction, keeps flowtables' cached flows correct when MACs, neighbours"
            " or routes change, and migrates queued connections between generations of a"
            " service's SO_REUSEPORT listeners. It runs as a command line tool and as a host"
            " agent (offloadctl agent), one per network namespace."
        ),
        ".PP",
        _roff(
            "Every error is one line on standard error and an exit status (see EXIT STATUS);"
            " a bad config names each field and line and changes nothing in the kernel."
        ),
        ".SH OPTIONS",
    ]
    lines += _options(root)
    lines.append(".SH COMMANDS")
    for cmd in tree[1:]:
        lines.append(f'.SS "{_roff(" ".join(cmd.path))}"')
        lines.append(f".B {_roff(cmd.usage)}")
        for para in _paragraphs(cmd.help):
            lines += [".PP", _roff(para)]
        for name, text in cmd.arguments:
            lines += [".TP", f"\\fI{_roff(name)}\\fR", _roff(text)]
        lines += _options(cmd)
        if cmd.subcommands:
            subs = ", ".join(" ".join((*cmd.path, s)) for s in cmd.subcommands)
            lines += [".PP", _roff(f"Commands: {subs}.")]
    lines.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        lines += [".TP", f".B {code}", _roff(text)]
    lines.append(".SH FILES")
    for path, text in FILES:
        lines += [".TP", f".I {_roff(path)}", _roff(text)]
    see_also = ", ".join(f"\\fB{_roff(name)}\\fR({sec})" for name, sec in SEE_ALSO)
    lines += [".SH SEE ALSO", see_also]
    return "\n".join(lines) + "\n"


def _options(cmd: Command) -> list[str]:
    out: list[str] = []
    for opt in cmd.options:
        if cmd.path and opt.flags == ("--help",):
            continue  # every command has it; said once, under OPTIONS
        left, text = opt.record
        out += [".TP", f"\\fB{_roff(left)}\\fR", _roff(text) if text else "\\&"]
    return out


# -- bash completion -------------------------------------------------------------


def bash_completion(tree: list[Command]) -> str:
    """A static completion function: no Python start-up per TAB."""
    cases: list[str] = []
    for cmd in tree:
        flags = " ".join(f for o in cmd.options for f in o.flags)
        valued = " ".join(f for o in cmd.options if o.takes_value for f in o.flags)
        netns = " ".join(f for o in cmd.options if o.value_kind == "netns" for f in o.flags)
        cases.append(
            f'        "{" ".join(cmd.path)}")\n'
            f'            subs="{" ".join(cmd.subcommands)}" opts="{flags}"\n'
            f'            valued=" {valued} " netns=" {netns} " ;;'
        )
    return _BASH.replace("@CASES@", "\n".join(cases)).replace("@PROG@", PROG)


_BASH = r"""# bash completion for @PROG@ (generated from its command tree; do not edit)
_@PROG@() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local path="" subs opts valued netns i w skip=0
    _@PROG@_spec() {
        case "$1" in
@CASES@
            *) subs="" opts="" valued=" " netns=" " ;;
        esac
    }
    _@PROG@_spec ""
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if ((skip)); then skip=0; continue; fi
        if [[ $valued == *" $w "* ]]; then skip=1; continue; fi
        if [[ $w != -* && " $subs " == *" $w "* ]]; then
            path=${path:+$path }$w
            _@PROG@_spec "$path"
        fi
    done
    if [[ $netns == *" $prev "* ]]; then
        COMPREPLY=($(compgen -W "$(ip netns list 2>/dev/null | cut -d' ' -f1)" -- "$cur"))
        return 0
    fi
    if [[ $valued == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ -n $subs ]]; then
        COMPREPLY=($(compgen -W "$subs" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
    return 0
}
complete -o default -F _@PROG@ @PROG@
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    makers = {"man": man_page, "bash": bash_completion}
    if len(args) != 1 or args[0] not in makers:
        print(f"usage: python -m controlplane.cli.docgen {{{'|'.join(makers)}}}", file=sys.stderr)
        return ExitCode.USAGE
    sys.stdout.write(makers[args[0]](command_tree()))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

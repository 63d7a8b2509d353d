"""Issue 14 against the host kernel (no flowtables, no 8021q): exit codes a script
can use, every interface name checked, one owner at a time, the log format, and
conntrack counters read back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.errors import ExitCode
from tests.netns.conftest import sh
from tests.netns.test_agent import (
    NAT,
    NAT2,
    AgentProc,
    agents,
    make_agent,
    router,
    rundir,
    table,
    wait_for,
)

__all__ = ["agents", "make_agent", "router", "rundir"]  # fixtures, imported for pytest

OFFLOADCTL = [sys.executable, "-m", "controlplane.cli"]
TS = r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "


def run(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*OFFLOADCTL, *args], capture_output=True, text=True, check=False)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def write(tmp_path: Path, data: dict[str, Any], name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# -- exit codes -------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_probe_exits_3_when_the_kernel_cannot_offload(as_json: bool) -> None:
    res = run("probe", *(["--json"] if as_json else []))
    assert res.returncode == ExitCode.UNSUPPORTED, (res.stdout, res.stderr)
    if as_json:
        caps = {c["name"]: c for c in json.loads(res.stdout)}
        assert caps["flowtables"]["ok"] is False and caps["conntrack"]["ok"] is True
    else:
        assert re.search(r"^flowtables\s+no ", res.stdout, re.M), res.stdout


@pytest.mark.parametrize("verb", ["validate", "render", "plan", "apply", "flush"])
def test_a_missing_config_file_is_exit_2_no_such_file(verb: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    res = run(verb, str(missing))
    assert res.returncode == ExitCode.USAGE
    assert res.stderr == f"offloadctl: {missing}: no such file\n"


def test_an_unreadable_config_file_is_exit_2_permission_denied(tmp_path: Path) -> None:
    cfg = write(tmp_path, NAT)
    cfg.chmod(0o600)
    tmp_path.chmod(0o755)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a non-root user: root reads any file
        code = 99
        try:
            sys.stderr = open(write_end, "w", closefd=False)  # noqa: SIM115 (pytest captures 2)
            os.setgid(65534)
            os.setuid(65534)
            from controlplane.cli import main

            main(["validate", str(cfg)])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 98
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        err = f.read()
    assert os.waitstatus_to_exitcode(status) == ExitCode.USAGE, err
    assert err == f"offloadctl: {cfg}: permission denied\n"


# -- every interface name checked --------------------------------------------------

TYPO = {
    "version": 1,
    "nat": {"masquerade": [{"oifname": "wan9", "saddr": ["10.0.1.0/24"]}]},
}


@pytest.mark.parametrize("verb", [("plan",), ("apply", "--check"), ("apply",)])
def test_a_typo_in_a_nat_interface_is_exit_4_and_nothing_changes(
    verb: tuple[str, ...], router: str, tmp_path: Path
) -> None:
    cfg = write(tmp_path, TYPO)
    res = run(*verb, str(cfg), "--netns", router)
    assert res.returncode == ExitCode.ENVIRONMENT, (res.stdout, res.stderr)
    assert res.stderr == (
        "offloadctl: nat.masquerade[0].oifname (line 4): interface 'wan9' does not exist"
        f" in network namespace '{router}' (devices: lan0, wan0; a trailing * matches"
        " by prefix)\n"
    )
    assert "offloadctl" not in table(router)


def test_a_wildcard_applies_and_plan_says_what_it_matches(router: str, tmp_path: Path) -> None:
    cfg = write(tmp_path, {"version": 1, "nat": {"masquerade": [{"oifname": "wan*"}]}})
    res = run("plan", str(cfg), "--netns", router)
    assert res.returncode == ExitCode.CHANGES, res.stderr
    assert (
        "# nat.masquerade[0].oifname (line 4): 'wan*' is a wildcard; matches wan0 now"
        in res.stdout.splitlines()
    )
    assert run("apply", str(cfg), "--netns", router).returncode == 0
    assert 'oifname "wan*" meta nfproto ipv4 masquerade' in table(router)


@pytest.mark.parametrize("verb", [("plan",), ("apply", "--check"), ("apply",)])
def test_vlans_on_a_kernel_without_8021q_fail_plan_and_check_as_apply(
    verb: tuple[str, ...], router: str, tmp_path: Path
) -> None:
    data = NAT | {"vlans": [{"name": "wan0.7", "parent": "wan0", "id": 7}]}
    res = run(*verb, str(write(tmp_path, data)), "--netns", router)
    assert res.returncode == ExitCode.UNSUPPORTED, (res.stdout, res.stderr)
    assert res.stderr.startswith(
        "offloadctl: vlans[0] (line 8): cannot create vlan wan0.7: kernel refused a VLAN"
    ), res.stderr
    assert "check passed" not in res.stdout
    assert "offloadctl" not in table(router) and "wan0.7" not in sh("ip", "link", netns=router)


def test_the_agent_refuses_an_unknown_interface(make_agent: Callable[..., AgentProc]) -> None:
    a = make_agent(TYPO)
    a.start(wait=False)
    assert a.wait() == ExitCode.ENVIRONMENT
    assert "interface 'wan9' does not exist" in a.log()


# -- one owner at a time ------------------------------------------------------------


def test_apply_and_flush_refuse_while_an_agent_owns_the_table_and_force_is_undone(
    make_agent: Callable[..., AgentProc], router: str, tmp_path: Path
) -> None:
    a = make_agent(NAT, "--drift-interval", "0.5").start()
    before = table(router)
    other = write(tmp_path, NAT2, "other.yaml")
    common = ("--netns", router, "--socket", str(a.socket))
    for verb in (("apply", str(other)), ("flush", str(other))):
        res = run(*verb, *common)
        assert res.returncode == ExitCode.ENVIRONMENT, (verb, res.stdout, res.stderr)
        assert res.stderr == (
            f"offloadctl: table inet offloadctl in network namespace '{router}' is managed"
            f" by the offloadctl agent (pid {a.proc.pid if a.proc else '?'}, config"
            f" {a.config}): edit that file and run 'offloadctl reload', or pass --force"
            " (the agent then restores its config within 0.5 s)\n"
        )
    assert table(router) == before  # nothing was written
    assert run("apply", "--check", str(other), *common).returncode == 0  # checking writes nothing
    # --force: written, then restored by the agent's next drift check.
    assert run("apply", str(other), *common, "--force").returncode == 0
    # Restored by a drift check (every 0.5 s here); the wait allows for a loaded machine.
    wait_for(lambda: "10.0.1.0/24" in table(router), "the agent to restore its rules", 15)
    assert "10.0.2.0/24" not in table(router)
    drift = [line for line in a.log().splitlines() if " event=drift " in line]
    assert drift and "level=warning" in drift[0] and "changes=" in drift[0], a.log()
    assert a.call("status").result["drift_repairs"] == 1
    assert run("flush", str(other), *common, "--force").returncode == 0
    wait_for(lambda: "10.0.1.0/24" in table(router), "the agent to re-create its table", 15)


def test_agent_log_lines_are_logfmt_and_journald_gets_no_second_timestamp(
    make_agent: Callable[..., AgentProc],
) -> None:
    a = make_agent(NAT)
    a.start()
    first = a.log().splitlines()[0]
    assert re.match(TS + r"level=info event=", first), first
    a.signal(15)
    assert a.wait() == 0
    # Under journald (JOURNAL_STREAM names the agent's stderr) the journal stamps lines.
    a.stderr.write_text("")
    st = os.stat(a.stderr)
    a.env = os.environ | {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    a.start()
    lines = a.log().splitlines()
    assert lines and all(line.startswith("level=") for line in lines), lines


# -- conntrack counters (the fast-path totals read them) --------------------------


def test_entry_counters_decode_the_kernels_counters(router: str, tmp_path: Path) -> None:
    from controlplane.kernel.ctnetlink.accounting import entry_counters

    assert run("apply", str(write(tmp_path, NAT)), "--netns", router).returncode == 0
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", netns=router)
    sh("ip", "link", "set", "lo", "up", netns=router)
    code = (
        "import socket\n"
        "r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(('127.0.0.1', 9999))\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(7): s.sendto(b'x' * 100, ('127.0.0.1', 9999)); r.recv(200)\n"
    )
    sh(sys.executable, "-c", code, netns=router)
    found = entry_counters(router, only_offloaded=False)
    assert (7, 7 * 128) in found.values(), found  # 7 x (20 IP + 8 UDP + 100)
    assert entry_counters(router) == {}  # nothing is offloaded on this kernel

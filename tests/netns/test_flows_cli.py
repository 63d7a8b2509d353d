"""``offloadctl flows``, ``flows teardown`` and ``watch`` against the real host kernel.

Lab (tests/netns/test_teardown.py): router R with bridge br0 (ports p1 → A,
p2 → B) and a masqueraded wan → S; TCP A/B → S:5000 (zone 0) and :5001
(zone 5). The host has no flowtables, so no entry is [OFFLOAD]: the tests set
the test-only switch OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED=1 and check that
without it nothing is listed or touched. Needs the VM: that real [OFFLOAD]
entries are listed and that a teardown un-stalls an offloaded transfer
(vm-tests, the move case).

A teardown re-creates the entries on the classic path (same tuples, zone and
NAT), so "torn down" is read from the conntrack id: a re-created entry has a
new one.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from controlplane.cli.common import app
from controlplane.core.flowbook import TESTING_ALL_OFFLOADED
from controlplane.core.flowpath import Flow
from controlplane.kernel.ctnetlink.conntrack import dump_flows
from controlplane.kernel.ctnetlink.events import CtEvents
from tests.netns.conftest import sh
from tests.netns.test_teardown import ALL, CLIENT, SERVER, Lab, lab, tcp_entries

__all__ = ["lab"]  # the fixture, imported for pytest

ON = {TESTING_ALL_OFFLOADED: "1"}


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env or {TESTING_ALL_OFFLOADED: "0"})
    return result.exit_code, result.stdout, result.stderr


def ids(router: str) -> dict[tuple[str, int, int], int]:
    """(client, server port, zone) → conntrack id of the router's TCP entries to S."""
    return {_key(flow): flow.id for flow in dump_flows(router) if _to_server(flow)}


def _to_server(flow: Flow) -> bool:
    return flow.orig.proto == 6 and flow.orig.dst == SERVER


def _key(flow: Flow) -> tuple[str, int, int]:
    client = next(k for k, v in CLIENT.items() if v == flow.orig.src)
    return (client, flow.orig.dport, flow.zone)


def mac_of(netns: str, dev: str = "eth0") -> str:
    return sh("cat", f"/sys/class/net/{dev}/address", netns=netns).strip()


def test_flows_lists_forwarded_flows_as_the_kernel_has_them(lab: Lab) -> None:
    """Issue 14 item 1: with no agent, ``flows`` reads conntrack and prints every
    forwarded flow with the kernel's offload bits (none here: the host kernel
    cannot offload), whatever the test switch says."""
    for env in (ON, None):
        code, out, err = run("flows", "--netns", lab.router, "--json", env=env)
        assert code == 0, err
        docs = [json.loads(line) for line in out.splitlines()]
        to_server = [d for d in docs if d["dst"] == SERVER and d["proto"] == 6]
        assert len(to_server) == 4
        assert not any(d["offloaded"] or d["hw_offloaded"] for d in docs)
        assert {d["tcp_state"] for d in to_server} == {"ESTABLISHED"}
        by_client = {(d["src"], d["dport"]): d for d in to_server}
        a = by_client[(CLIENT["A"], 5001)]
        assert a["zone"] == 5
        assert a["orig_devices"] == ["wan"]
        assert a["reply_devices"] == ["br0", "p1"]
    code, out, _ = run("flows", "--netns", lab.router)
    lines = out.splitlines()
    assert code == 0 and len([x for x in lines if x.startswith("tcp ")]) == 4
    assert all(" classic ESTABLISHED " in x for x in lines if x.startswith("tcp "))
    assert lines[-1] == f"0 of {len(lines) - 1} forwarded flow(s) offloaded"


def test_flows_and_teardown_select_the_same_set(lab: Lab) -> None:
    """The same selector picks the same flows in ``flows`` and ``flows teardown``;
    teardown then acts on the offloaded ones only (here: none)."""
    code, out, err = run("flows", "--ip", CLIENT["B"], "--netns", lab.router, "--json")
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert {(d["src"], d["dport"]) for d in listed} == {(CLIENT["B"], 5000), (CLIENT["B"], 5001)}
    code, out, err = run(
        "flows", "teardown", "--ip", CLIENT["B"], "--netns", lab.router, "--dry-run"
    )
    assert code == 0, err
    assert "ip 10.0.1.3: 2 forwarded flow(s) selected (as 'flows' lists them), 0 offloaded" in out
    assert "would tear down" not in out
    code, out, _ = run("flows", "--offloaded", "--netns", lab.router)
    assert (code, out) == (0, "0 of 0 forwarded flow(s) offloaded\n")
    code, _, err = run("flows", "--ip", "10.0.1.2", "--dev", "p1", "--netns", lab.router)
    assert code == 2 and "give at most one of --mac, --ip, --prefix, --dev" in err


@pytest.mark.parametrize(
    ("flag", "value", "torn"),
    [
        ("--dev", "p1", {"A"}),
        ("--dev", "wan", {"A", "B"}),
        ("--mac", "A", {"A"}),
        ("--ip", CLIENT["B"], {"B"}),
        ("--prefix", f"{CLIENT['A']}/32", {"A"}),
        ("--prefix", "10.0.1.0/24", {"A", "B"}),
        ("--ip", "10.9.9.9", set()),
    ],
    ids=["dev-p1", "dev-wan", "mac-A", "ip-B", "prefix-A", "prefix-lan", "ip-none"],
)
def test_teardown_by_selector_touches_exactly_its_flows(
    lab: Lab, flag: str, value: str, torn: set[str]
) -> None:
    if flag == "--mac":
        value = mac_of(lab.clients[value])
    assert set(ids(lab.router)) == ALL
    # The kernel's NEW events say which entries were re-created, and a re-create
    # (NLM_F_EXCL) only succeeds once the old entry is deleted. (Comparing ids
    # before/after cannot: a re-created entry may get its old id back, the id
    # hashing the entry's address and tuples. DESTROY events cannot either: with
    # nf_conntrack_events=2 only entries born while a listener existed report it.)
    with CtEvents(lab.router) as events:
        code, out, err = run("flows", "teardown", flag, value, "--netns", lab.router, env=ON)
        changes, lost = events.poll()  # queued synchronously by each delete
    assert code == 0, err
    assert not lost
    assert set(ids(lab.router)) == ALL  # re-created, zones kept (5001 stays in zone 5)
    changed = {_key(c.flow) for c in changes if c.new and _to_server(c.flow)}
    assert changed == {key for key in ALL if key[0] in torn}
    assert out.count("tore down ") == len(changed)
    assert f"{len(changed)} deleted, {len(changed)} re-created" in out
    # the connections still work, on the classic path
    for key in lab.conns:
        assert lab.roundtrip(key, b"ping" * 64) == b"ping" * 64


def test_dry_run_and_no_switch_change_nothing(lab: Lab) -> None:
    before = ids(lab.router)
    args = ("flows", "teardown", "--dev", "p1", "--netns", lab.router)
    code, out, err = run(*args, "--dry-run", env=ON)
    assert code == 0, err
    assert out.count("would tear down ") == 2
    code, out, err = run(*args)
    assert code == 0, err
    # Only offloaded entries are torn down: the host kernel has none.
    assert "dev p1: 2 forwarded flow(s) selected (as 'flows' lists them), 0 offloaded" in out
    assert ids(lab.router) == before


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--mac", "02:00:00:00:00"], "'02:00:00:00:00'"),
        (["--mac", "zz:zz:zz:zz:zz:zz"], "zz:zz:zz:zz:zz:zz"),
        (["--ip", "10.0.1.300"], "10.0.1.300"),
        (["--prefix", "10.0.0.0/33"], "10.0.0.0/33"),
        (["--prefix", "fe80::%wan/64"], "fe80::%wan/64"),
        (["--prefix", "10.0.1.2/24"], "host bits set"),
        (["--dev", "nosuch0"], "nosuch0"),
        (["--dev", "p1", "--netns", "cpt-no-such-ns"], "cpt-no-such-ns"),
        ([], "exactly one of"),
        (["--dev", "p1", "--ip", "10.0.1.2"], "exactly one of"),
    ],
    ids=[
        "mac-short",
        "mac-hex",
        "ip",
        "prefix-len",
        "prefix-zone",
        "prefix-host-bits",
        "dev",
        "netns",
        "none",
        "two",
    ],
)
def test_bad_input_is_one_line_and_tears_nothing_down(
    lab: Lab, args: list[str], named: str
) -> None:
    before = ids(lab.router)
    if "--netns" not in args:
        args = [*args, "--netns", lab.router]
    code, out, err = run("flows", "teardown", *args, env=ON)
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert named in err
    assert "tore down" not in out
    assert ids(lab.router) == before
    assert tcp_entries(lab.router) == ALL


class Lines:
    """``watch --json`` output read from the raw pipe: select() and a buffered
    readline() disagree about what is pending, so buffer here."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def until(self, predicate: object, timeout: float = 15.0) -> list[dict[str, object]]:
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                doc = json.loads(line)
                seen.append(doc)
                if predicate(doc):  # type: ignore[operator]
                    return seen
            ready, _, _ = select.select([self.fd], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.buf += chunk
        raise AssertionError(f"watch never printed the expected line; saw {seen}")


@pytest.mark.parametrize("dry_run", [False, True])
def test_watch_tears_down_a_moved_mac_and_exits_on_sigterm(lab: Lab, dry_run: bool) -> None:
    """A's MAC moves from p1 to p2 (one RTM_NEWNEIGH): exactly A's flows go, B's stay.
    Needs the VM: that A's offloaded transfer was stalled and resumes."""
    env = os.environ | ON
    cmd = [sys.executable, "-m", "controlplane.cli", "watch", "--netns", lab.router, "--json"]
    proc = subprocess.Popen(
        [*cmd, *(["--dry-run"] if dry_run else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    lines_of = Lines(proc)
    # Which entries were re-created is the kernel's word (their NEW events), not a change
    # of conntrack id: a re-created entry can get its old id back (docs/kernel-facts.md).
    with CtEvents(lab.router) as events:
        try:
            lines_of.until(lambda d: d.get("event") == "ready")
            mac = mac_of(lab.clients["A"])
            sh("bridge", "fdb", "replace", mac, "dev", "p2", "master", netns=lab.router)
            lines = lines_of.until(lambda d: d.get("decision") in ("tore down", "would tear down"))
            decision = lines[-1]
            assert decision["flows"] == 2, decision  # A's two flows (zones 0 and 5), not B's
            assert any(d.get("event") == "FdbEntryChanged" for d in lines)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        changes, lost = events.poll()  # the watch has exited: every re-create is queued
    assert proc.returncode == 0, err.decode()
    last = json.loads((lines_of.buf + out).splitlines()[-1])
    assert last.pop("ts").endswith("Z")  # issue 14: every --json line carries ts
    assert last == {"event": "stopped", "signal": "SIGTERM"}
    assert not lost
    recreated = {_key(c.flow) for c in changes if c.new and _to_server(c.flow)}
    assert recreated == (set() if dry_run else {k for k in ALL if k[0] == "A"}), decision
    assert set(ids(lab.router)) == ALL  # re-created in their zones (5001 stays in zone 5)

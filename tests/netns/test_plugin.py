"""The pytest plugin itself (``controlplane.testing``), run the way users run it: pytest in
a subprocess (pytester) with the installed entry point, against the host kernel."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from controlplane.testing import (
    Bridge,
    Count,
    NetLab,
    Netns,
    Route,
    Topology,
    TrafficError,
    Veth,
    topology,
    vm,
)
from controlplane.testing.plugin import NOT_ROOT

pytest_plugins = ("pytester",)  # here, not in conftest: `pytest tests` loads that late

# A lab on the host kernel (no VLAN devices here): router with a bridge, two hosts.
LAB = """
import json, os, time
from pathlib import Path
import pytest
from controlplane.testing import Bridge, Netns, Route, Topology, Veth

TOPO = Topology(
    namespaces={
        "a": Netns(addresses={"eth0": "10.0.1.2/24"}, routes=[Route("default", "10.0.1.1")]),
        "r": Netns(forwarding=True, bridges=[Bridge("br0", ports=["p1"])],
                   addresses={"br0": "10.0.1.1/24", "wan0": "192.0.2.1/24"}),
        "b": Netns(addresses={"eth0": "192.0.2.2/24"}, routes=[Route("default", "192.0.2.1")]),
    },
    links=[Veth("a:eth0", "r:p1"), Veth("r:wan0", "b:eth0")],
)
OUT = Path(os.environ["PLUGIN_TEST_OUT"])

def record(request, lab):
    names = sorted(lab.built.names.values())
    assert all(os.path.exists(f"/run/netns/{n}") for n in names)
    (OUT / f"{request.node.name}.json").write_text(json.dumps(names))
"""


def _names(out: Path) -> dict[str, list[str]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def _existing(names: list[str]) -> list[str]:
    return [n for n in names if os.path.exists(f"/run/netns/{n}")]


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    monkeypatch.setenv("PLUGIN_TEST_OUT", str(d))
    return d


def test_namespaces_deleted_after_a_failing_test(pytester: pytest.Pytester, out: Path) -> None:
    pytester.makepyfile(
        LAB
        + """
def test_fails(netlab, request):
    lab = netlab.build(TOPO)
    record(request, lab)
    conn = lab.tcp("a", "b", "192.0.2.2", 5000)
    conn.exchange(4096)
    assert conn.server_saw[0] == "10.0.1.2"  # no NAT here
    assert False, "the test fails after its traffic"

def test_build_fails_half_way(netlab, request):
    from controlplane.testing import CommandFailed
    bad = Topology(namespaces={"x": Netns(routes=[Route("10.9.0.0/16", via="10.99.0.1")])})
    try:
        netlab.build(bad)  # the kernel refuses the route: no such gateway
    except CommandFailed:
        (OUT / "half.json").write_text(json.dumps(netlab.created))
        raise
"""
    )
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(failed=2)
    res.stdout.fnmatch_lines(["*the test fails after its traffic*", "*Nexthop*gateway*"])
    names = _names(out)
    assert len(names["test_fails"]) == 3 and len(names["half"]) == 1
    assert _existing(names["test_fails"] + names["half"]) == []


def test_kill9_leftovers_removed_by_the_next_run(pytester: pytest.Pytester, out: Path) -> None:
    pytester.makepyfile(
        LAB
        + """
import signal

def test_killed(netlab, request):
    record(request, netlab.build(TOPO))
    os.kill(os.getpid(), signal.SIGKILL)  # pytest dies here: no finalizer runs
"""
    )
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert res.ret == -9
    left = _names(out)["test_killed"]
    assert _existing(left) == left  # the kill left them behind
    mine = topology.add_namespace("live", [])  # a live run's namespace (this process)
    try:
        pytester.makepyfile(test_other="def test_nothing(): pass")
        res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_other.py")
        res.assert_outcomes(passed=1)
        assert _existing(left) == []  # removed at start-up of the next run
        assert _existing([mine]) == [mine]  # whose owner lives: left alone
    finally:
        topology.delete_namespace(mine)


def test_parallel_tests_never_share_a_name(pytester: pytest.Pytester, out: Path) -> None:
    pytester.makepyfile(
        LAB
        + """
@pytest.mark.parametrize("n", range(4))
def test_parallel(netlab, request, n):
    record(request, netlab.build(TOPO))
    # Wait (bounded) until a test of the other worker holds its lab at the same time.
    deadline = time.monotonic() + 60
    while len({p.read_text() for p in OUT.glob("*.pid")}) < 2 and time.monotonic() < deadline:
        (OUT / f"{os.getpid()}.pid").write_text(str(os.getpid()))
        time.sleep(0.05)
    assert len(list(OUT.glob("*.pid"))) == 2
"""
    )
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    res.assert_outcomes(passed=4)
    names = _names(out)
    every = [n for ns in names.values() for n in ns]
    assert len(names) == 4 and len(every) == len(set(every)) == 12
    pids = {n.split("-")[1].split("_")[0] for n in every}
    assert len(pids) == 2  # two workers, each its own run token
    assert _existing(every) == []


@pytest.mark.parametrize(
    ("mode", "path", "expect"),
    [
        ("never", None, "--offload-vm=never"),
        ("auto", "/nonexistent", "qemu-system-x86_64 not found*"),
        ("require", "/nonexistent", "qemu-system-x86_64 not found*not skipping*"),
    ],
)
def test_offload_vm_without_a_vm_skips_or_stops_with_the_reason(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    path: str | None,
    expect: str,
) -> None:
    """This host lacks flowtables and VLAN devices: with no VM either (ruled out, or no
    qemu on PATH), a marked test is skipped saying both, or stops the run (require). With
    a VM the tests go there: `make example-test`."""
    pytester.makepyfile(
        """
import pytest

@pytest.mark.offload_vm
def test_needs_offload(netlab):
    raise AssertionError("must not run on this host")
"""
    )
    if path is not None:
        monkeypatch.setenv("PATH", path)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", f"--offload-vm={mode}")
    reason = f"*offload_vm: host kernel: flowtables: *; no VM: {expect}"
    if mode == "require":
        assert res.ret == pytest.ExitCode.USAGE_ERROR
        res.stderr.fnmatch_lines([reason])
    else:
        res.assert_outcomes(skipped=1)
        res.stdout.fnmatch_lines([reason])


def test_a_vm_that_cannot_run_fails_the_tests_it_was_given(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The VM runner refuses before booting (a cache path with a space): each test sent
    there fails with the runner's reason; none falls back to running on the host."""
    pytester.makepyfile(
        """
import pytest

@pytest.mark.offload_vm
@pytest.mark.parametrize("n", [1, 2])
def test_needs_offload(netlab, n):
    raise AssertionError("ran on the host")
"""
    )
    monkeypatch.setenv("OFFLOADCTL_VM_CACHE", str(tmp_path / "with space"))
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--offload-vm=always")
    res.assert_outcomes(errors=2)
    res.stdout.fnmatch_lines(
        ["*the VM run ended without a result*(the runner: *path must not contain whitespace*"]
    )
    res.stdout.no_fnmatch_line("*ran on the host*")


def test_a_busy_vm_fails_its_tests_with_the_reason_not_the_session(
    pytester: pytest.Pytester,
) -> None:
    """Another run holds the machine's VM: the wait is bounded by --offload-vm-timeout
    and the tests fail naming the lock. pytest-timeout's per-test limit (shorter here)
    must not end the session while the first VM test's protocol waits (INTERNALERROR)."""
    pytester.makepyfile(
        """
import pytest

@pytest.mark.offload_vm
@pytest.mark.parametrize("n", [1, 2])
def test_needs_offload(netlab, n):
    raise AssertionError("ran on the host")
"""
    )
    fd = os.open(vm.MACHINE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running VM holds it
        res = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "--offload-vm=always",
            "--offload-vm-timeout=4",
            "-o",
            "timeout=2",
        )
    finally:
        os.close(fd)
    res.assert_outcomes(errors=2)
    res.stdout.fnmatch_lines(["*has held the VM machine lock*for 4 s*"])
    res.stdout.no_fnmatch_line("*INTERNALERROR*")


def test_deselected_vm_tests_are_not_planned(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-k` runs first: a deselected offload_vm test neither boots a VM nor stops the run."""
    pytester.makepyfile(
        """
import pytest

@pytest.mark.offload_vm
def test_needs_offload(netlab):
    pass

def test_plain():
    pass
"""
    )
    monkeypatch.setenv("PATH", "/nonexistent")  # no VM possible: require would stop the run
    res = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-k", "plain", "--offload-vm=require"
    )
    res.assert_outcomes(passed=1, deselected=1)


def test_not_root_is_one_clear_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lab="def test_lab(netlab): pass")
    # pytester's own directory is closed to other users: copy the test somewhere open.
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)
        test = Path(tmp) / "test_lab.py"
        test.write_text((pytester.path / "test_lab.py").read_text())
        os.chmod(test, 0o644)
        res = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "pytest", "-p", "offloadctl", "-p", "no:cacheprovider",
             "--rootdir", tmp, str(test)],
            capture_output=True, text=True, check=False, cwd=tmp,
            env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "HOME": tmp},
        )  # fmt: skip
    assert res.returncode == pytest.ExitCode.USAGE_ERROR, res.stdout + res.stderr
    assert res.stderr.strip() == f"ERROR: {NOT_ROOT}"


# --------------------------------------------------------------------------- the helpers
# on the host kernel (no flowtables: nothing is offloaded, everything is classic path)

ROUTER = Topology(
    namespaces={
        "lan": Netns(
            addresses={"eth0": ["10.0.1.2/24", "fd00:1::2/64"]},
            routes=[Route("default", "10.0.1.1"), Route("default6", "fd00:1::1")],
        ),
        "router": Netns(
            forwarding=True,
            bridges=[Bridge("br0", ports=["lan0"], address="02:00:00:00:01:01")],
            addresses={
                "br0": ["10.0.1.1/24", "fd00:1::1/64"],
                "wan0": ["192.0.2.1/24", "fd00:2::1/64"],
            },
        ),
        "wan": Netns(  # v4 back to the LAN only through masquerade
            addresses={"eth0": ["192.0.2.2/24", "fd00:2::2/64"]},
            routes=[Route("default6", "fd00:2::1")],
        ),
    },
    links=[Veth("lan:eth0", "router:lan0"), Veth("router:wan0", "wan:eth0")],
)
MASQUERADE = {"version": 1, "nat": {"masquerade": [{"oifname": "wan0", "saddr": ["10.0.1.0/24"]}]}}


def test_topology_is_built_as_described(netlab: NetLab) -> None:
    lab = netlab.build(ROUTER)
    links = {d["ifname"]: d for d in json.loads(lab.sh("router", "ip", "-j", "-d", "link"))}
    assert links["lan0"]["master"] == "br0" and links["br0"]["address"] == "02:00:00:00:01:01"
    assert all("UP" in links[d]["flags"] for d in ("lan0", "wan0", "br0"))
    addrs = lab.sh("router", "ip", "-br", "addr", "show", "dev", "br0")
    assert "10.0.1.1/24" in addrs and "fd00:1::1/64" in addrs
    assert "default via fd00:1::1" in lab.sh("lan", "ip", "-6", "route")
    assert lab.sh("router", "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"


def test_masquerade_seen_by_the_server_and_on_the_wire(netlab: NetLab) -> None:
    lab = netlab.build(ROUTER)
    lab.apply("router", MASQUERADE)
    with lab.capture("wan", "eth0") as wire:
        tcp = lab.tcp("lan", "wan", "192.0.2.2", 5000)
        tcp.exchange(256 * 1024)
        udp = lab.udp("lan", "wan", "192.0.2.2", 5353)
        udp.exchange(10)
    assert tcp.client[0] == "10.0.1.2" and tcp.server_saw[0] == "192.0.2.1"
    assert udp.server_saw[0] == "192.0.2.1"
    assert wire.seen(src="192.0.2.1", dport=5000, proto="tcp") > 0
    assert wire.seen(src="192.0.2.1", dport=5353, proto="udp") >= 10
    assert wire.seen(src="10.0.1.2") == wire.seen(dst="10.0.1.2") == 0


def test_byte_exact_check_fails_when_bytes_go_missing(netlab: NetLab) -> None:
    lab = netlab.build(ROUTER)
    tcp = lab.tcp("lan", "wan", "fd00:2::2", 5000, timeout=2.0)  # v6, no NAT
    assert tcp.server_saw[0] == "fd00:1::2"
    tcp._conn.sendall(b"stray")  # a byte stream that is not what exchange() sends
    with pytest.raises(TrafficError, match=r"download: .* sha256"):
        tcp.exchange(4096)
    lab.sh("router", "ip", "link", "set", "wan0", "down")
    udp = lab.udp("lan", "wan", "192.0.2.2", 5353, timeout=0.5)
    with pytest.raises(TrafficError, match="datagram 0 of 3 lost"):
        udp.exchange(3)


def test_conntrack_and_classic_path_counters(netlab: NetLab) -> None:
    lab = netlab.build(ROUTER)
    lab.apply("router", MASQUERADE)
    classic = lab.classic_path("router")
    tcp = lab.tcp("lan", "wan", "192.0.2.2", 5000)
    tcp.exchange(1 << 20)
    entry = lab.conntrack_entry("router", tcp)
    assert entry is not None and entry.orig.sport == tcp.client[1]
    assert entry.reply.dst == "192.0.2.1"  # the masqueraded side
    assert not entry.offloaded  # this kernel has no flowtables
    with pytest.raises(AssertionError, match=r"not offloaded .* status"):
        lab.wait_offloaded("router", tcp, timeout=0.2)
    seen = classic.read()
    # No fast path here: each direction's megabyte crossed the forward hook.
    assert seen["br0"].bytes > 1 << 20 and seen["wan0"].bytes > 1 << 20
    assert seen["lan0"] == Count(0, 0)  # bridged in, routed from br0

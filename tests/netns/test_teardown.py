"""Flow teardown against the real host kernel.

Lab: a router namespace with bridge br0 (ports p1, p2 to clients A and B) and
a masqueraded "wan" veth to a server S. TCP connections go from each client
to S port 5000 (conntrack zone 0) and 5001 (zone 5, set in the raw hook for
both directions). The host has no flowtables, so nothing is [OFFLOAD]:
teardown runs with ``only_offloaded=False`` and the conntrack entries of
forwarded flows stand in for offloaded ones.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.errors import KernelError
from controlplane.kernel.ctnetlink.conntrack import (
    NETLINK_NETFILTER,
    ConntrackSocket,
    delete_flows,
    dump_flows,
)
from controlplane.kernel.ctnetlink.events import NFNLGRP_CONNTRACK_NEW, CtChange, CtEvents
from controlplane.kernel.ctnetlink.teardown import teardown_flows_via
from controlplane.kernel.netlink import NetlinkSocket
from controlplane.kernel.netns import entered
from controlplane.kernel.rtnl.topology import bridge_ports, link_names, snapshot
from controlplane.testing import Bridge, NetLab, Netns, Route, Topology, Veth, sh

SERVER = "192.0.2.2"
WAN_ADDR = "192.0.2.1"
CLIENT = {"A": "10.0.1.2", "B": "10.0.1.3"}
PORT_ZONE = {5000: 0, 5001: 5}

RULESET = """
table ip cpt {
    chain raw_pre {
        type filter hook prerouting priority raw;
        tcp dport 5001 ct zone set 5
        tcp sport 5001 ct zone set 5
    }
    chain post {
        type nat hook postrouting priority srcnat;
        oifname "wan" masquerade
    }
}
"""


@dataclass
class Lab:
    router: str
    clients: dict[str, str]
    server: str
    conns: dict[tuple[str, int], socket.socket] = field(default_factory=dict)

    def roundtrip(self, key: tuple[str, int], payload: bytes) -> bytes:
        conn = self.conns[key]
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _serve(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # listener closed at teardown
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _client(addr: str) -> Netns:
    return Netns(addresses={"eth0": f"{addr}/24"}, routes=[Route("default", "10.0.1.1")])


TOPOLOGY = Topology(
    namespaces={
        "r": Netns(
            forwarding=True,
            bridges=[Bridge("br0", ports=["p1", "p2"])],
            addresses={"br0": "10.0.1.1/24", "wan": f"{WAN_ADDR}/24"},
        ),
        "a": _client(CLIENT["A"]),
        "b": _client(CLIENT["B"]),
        "s": Netns(addresses={"eth0": f"{SERVER}/24"}),
    },
    links=[Veth("r:p1", "a:eth0"), Veth("r:p2", "b:eth0"), Veth("r:wan", "s:eth0")],
)


@pytest.fixture
def lab(netlab: NetLab) -> Iterator[Lab]:
    built = netlab.build(TOPOLOGY)
    r, a, b, s = (built.ns(role) for role in ("r", "a", "b", "s"))
    sh("nft", "-f", "-", netns=r, input=RULESET)

    listeners = []
    with entered(s):
        for port in PORT_ZONE:
            listener = socket.create_server(("0.0.0.0", port))
            listeners.append(listener)
            threading.Thread(target=_serve, args=(listener,), daemon=True).start()
    lab = Lab(router=r, clients={"A": a, "B": b}, server=s)
    try:
        for client, ns in lab.clients.items():
            with entered(ns):
                for port in PORT_ZONE:
                    conn = socket.create_connection((SERVER, port), timeout=5)
                    lab.conns[(client, port)] = conn
        for key in lab.conns:
            assert lab.roundtrip(key, b"hello") == b"hello"
        yield lab
    finally:
        for conn in lab.conns.values():
            conn.close()
        for listener in listeners:
            listener.close()


_CT_LINE = re.compile(r"src=(\S+) dst=\S+ sport=(\d+) dport=(\d+) .*?(?:zone=(\d+))?\s*use=")


def tcp_entries(router: str) -> set[tuple[str, int, int]]:
    """(client, server port, zone) of the router's TCP entries, read by the conntrack tool."""
    out = sh("conntrack", "-L", "-p", "tcp", netns=router)
    entries = set()
    for line in out.splitlines():
        m = _CT_LINE.search(line)
        assert m, line
        client = next(k for k, v in CLIENT.items() if v == m.group(1))
        entries.add((client, int(m.group(3)), int(m.group(4) or 0)))
    return entries


ALL = {("A", 5000, 0), ("A", 5001, 5), ("B", 5000, 0), ("B", 5001, 5)}


@pytest.mark.parametrize(
    ("devices", "torn_down"),
    [
        ({"p1"}, {"A"}),
        ({"p2"}, {"B"}),
        ({"wan"}, {"A", "B"}),
        ({"br0"}, {"A", "B"}),
        ({"p1", "p2"}, {"A", "B"}),
        ({"lo"}, set()),
    ],
    ids=["p1", "p2", "wan", "br0", "both-ports", "lo"],
)
def test_teardown_deletes_exactly_the_flows_through_the_devices(
    lab: Lab, devices: set[str], torn_down: set[str]
) -> None:
    assert tcp_entries(lab.router) == ALL
    report = teardown_flows_via(devices, netns=lab.router, only_offloaded=False, reinject=False)

    expected_gone = {e for e in ALL if e[0] in torn_down}
    assert tcp_entries(lab.router) == ALL - expected_gone
    assert report.examined >= 4  # plus whatever else the netns tracks (ND, ...)
    assert report.matched == report.deleted == len(expected_gone)
    assert report.already_gone == 0
    assert report.ambiguous == 0
    assert sum(report.per_device.values()) >= report.matched
    assert set(report.per_device) == devices

    # The connections survive: the next client packet recreates the entry
    # (nf_conntrack_tcp_loose), in the same zone, with the same masquerade.
    for key in lab.conns:
        assert lab.roundtrip(key, b"more data " * 100) == b"more data " * 100
    assert tcp_entries(lab.router) == ALL


def test_per_device_counts_and_unknown_devices(lab: Lab) -> None:
    report = teardown_flows_via(
        {"p1", "wan", "gone0"}, netns=lab.router, only_offloaded=False, reinject=False
    )
    assert report.per_device == {"p1": 2, "wan": 4}
    assert report.matched == report.deleted == 4
    assert report.unknown_devices == {"gone0"}
    assert set(report.timings) == {"dump", "topology", "resolve", "delete"}


def test_only_offloaded_skips_classic_path_flows(lab: Lab) -> None:
    # Nothing can be offloaded on this kernel: the default mode must touch nothing.
    report = teardown_flows_via({"wan"}, netns=lab.router)
    assert (report.examined, report.matched, report.deleted) == (0, 0, 0)
    assert tcp_entries(lab.router) == ALL


def test_topology_helpers(lab: Lab) -> None:
    assert bridge_ports("br0", netns=lab.router) == ["p1", "p2"]
    assert {"br0", "p1", "p2", "wan", "lo"} <= link_names(netns=lab.router)
    topo = snapshot([CLIENT["A"], SERVER, WAN_ADDR, "203.0.113.9"], netns=lab.router)
    wan_route = topo.routes[WAN_ADDR]
    assert wan_route is not None and wan_route.local
    assert topo.routes["203.0.113.9"] is None  # no default route in the router
    route = topo.routes[CLIENT["A"]]
    assert route is not None and route.oif == topo.ifindex("br0")


def _insert(router: str, *args: str) -> None:
    sh("conntrack", "-I", *args, "-t", "300", netns=router)


def test_dump_decodes_what_the_kernel_holds(netns: str) -> None:
    _insert(
        netns,
        *("-s", "10.1.0.1", "-d", "10.2.0.1", "-p", "tcp", "--sport", "1234", "--dport", "80"),
        *("--state", "ESTABLISHED", "-w", "7", "-m", "42"),
    )
    _insert(netns, "-s", "fd00::1", "-d", "fd00::2", "-p", "udp", "--sport", "53", "--dport", "99")
    _insert(
        netns,
        *("-s", "10.1.0.1", "-d", "10.2.0.1", "-p", "icmp"),
        *("--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "77"),
    )
    flows = {(f.orig.proto, f.orig.family): f for f in dump_flows(netns)}
    assert set(flows) == {(6, Family.IPV4), (17, Family.IPV6), (1, Family.IPV4)}
    t = flows[(6, Family.IPV4)]
    assert t.orig == CtTuple(Family.IPV4, 6, "10.1.0.1", "10.2.0.1", 1234, 80)
    assert t.reply == CtTuple(Family.IPV4, 6, "10.2.0.1", "10.1.0.1", 80, 1234)
    assert (t.zone, t.mark, t.offloaded) == (7, 42, False)
    assert t.id != 0
    u = flows[(17, Family.IPV6)]
    assert (u.orig.src, u.orig.dst, u.orig.sport, u.orig.dport) == ("fd00::1", "fd00::2", 53, 99)
    i = flows[(1, Family.IPV4)]
    assert (i.orig.icmp_id, i.orig.icmp_type, i.orig.icmp_code) == (77, 8, 0)
    assert i.reply.icmp_type == 0  # echo reply
    assert len(dump_flows(netns, family=Family.IPV6)) == 1

    result = delete_flows(flows.values(), netns)
    assert (result.deleted, result.already_gone) == (3, 0)
    assert dump_flows(netns) == []
    # Second delete: every entry is already gone, which is not an error.
    result = delete_flows(flows.values(), netns)
    assert (result.deleted, result.already_gone) == (0, 3)


def test_delete_hits_the_right_zone_and_id(netns: str) -> None:
    # Same tuple in zone 0 and zone 5: deleting the zone-5 entry must leave the
    # zone-0 twin (pyroute2's ct.delete(entry) would drop the zone).
    tuple_args = ("-s", "10.1.0.1", "-d", "10.2.0.1", "-p", "udp", "--sport", "1", "--dport", "2")
    _insert(netns, *tuple_args)
    _insert(netns, *tuple_args, "-w", "5")
    flows = dump_flows(netns)
    assert sorted(f.zone for f in flows) == [0, 5]
    zone5 = next(f for f in flows if f.zone == 5)
    assert delete_flows([zone5], netns).deleted == 1
    assert [f.zone for f in dump_flows(netns)] == [0]

    # A stale id (the entry was recreated since the dump) must not delete the new entry.
    zone0 = dump_flows(netns)[0]
    stale = Flow(zone0.orig, zone0.reply, id=zone0.id ^ 1, zone=0)
    assert delete_flows([stale], netns).already_gone == 1
    assert dump_flows(netns) == [zone0]


BENCH_N = int(os.environ.get("CPT_TEARDOWN_BENCH_N", "5000"))


def test_bench_examine_and_delete(lab: Lab) -> None:
    """Timing only (printed with -s); correctness asserted, speed not."""
    with entered(lab.server):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("0.0.0.0", 9))
    try:
        t0 = time.perf_counter()
        with entered(lab.clients["A"]):
            for i in range(BENCH_N):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("0.0.0.0", 10000 + i))
                    s.sendto(b"x", (SERVER, 9))
        created = time.perf_counter() - t0
        with ConntrackSocket(lab.router) as ct:
            count = len(ct.dump())
        assert count >= BENCH_N + 4

        miss = teardown_flows_via({"p2"}, netns=lab.router, only_offloaded=False, reinject=False)
        assert miss.matched == 2  # only B's TCP flows
        hit = teardown_flows_via({"p1"}, netns=lab.router, only_offloaded=False, reinject=False)
        assert hit.deleted == hit.matched >= BENCH_N + 2
        with ConntrackSocket(lab.router) as ct:
            left = ct.dump()
        # B's TCP entries went with p2; only the router's own traffic (IGMP) may remain.
        assert CLIENT["A"] not in {f.orig.src for f in left}
        assert {f.orig.src for f in left} <= {CLIENT["B"], "10.0.1.1"}
    finally:
        sink.close()

    print(f"\n[bench] {BENCH_N} UDP flows created in {created:.2f}s")
    for label, r in (("examine, delete 2", miss), ("examine, delete all A", hit)):
        steps = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in r.timings.items())
        print(
            f"[bench] {label}: examined={r.examined} matched={r.matched} deleted={r.deleted}"
            f" elapsed={r.elapsed * 1000:.0f}ms ({steps})"
        )


@pytest.mark.parametrize("reinject", [False, True])
def test_reinjection_keeps_a_masqueraded_download_alive(lab: Lab, reinject: bool) -> None:
    """A silent client downloading through masquerade: after a bare delete the server's
    next segment is addressed to the router itself (no entry) and never reaches the
    client; after delete + re-create (same tuples, zone and NAT) it flows on."""
    with entered(lab.server):
        listener = socket.create_server(("0.0.0.0", 6000))
    with entered(lab.clients["A"]):
        client = socket.create_connection((SERVER, 6000), timeout=5)
    conn, _ = listener.accept()
    try:
        conn.sendall(b"x" * 1000)
        assert len(client.recv(4096)) > 0
        before = [f for f in dump_flows(lab.router) if f.orig.dport == 6000]
        report = teardown_flows_via(
            {"p1"}, netns=lab.router, only_offloaded=False, reinject=reinject
        )
        assert report.deleted >= 1
        after = [f for f in dump_flows(lab.router) if f.orig.dport == 6000]
        if reinject:
            assert report.recreated == report.deleted
            assert [(f.orig, f.reply, f.zone) for f in after] == [
                (f.orig, f.reply, f.zone) for f in before
            ]
            assert after[0].reply.dst == WAN_ADDR  # the masquerade mapping survived
        else:
            assert after == []
        conn.sendall(b"y" * 1000)
        client.settimeout(2.5)
        try:
            got = client.recv(4096)
        except TimeoutError:
            got = b""
        assert (len(got) > 0) == reinject, got[:10]
    finally:
        for s in (client, conn, listener):
            s.close()


def test_recreated_entries_take_the_namespaces_timeout_sysctls(lab: Lab) -> None:
    """Re-created entries get the timeouts the namespace configures (core/reinject
    decides, kernel/ctnetlink reads /proc/sys/net/netfilter), not constants."""
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_established=4321", netns=lab.router)
    before = {f.id for f in dump_flows(lab.router) if f.orig.proto == 6}
    report = teardown_flows_via({"p1"}, netns=lab.router, only_offloaded=False)
    assert report.deleted == report.recreated == 2
    out = sh("conntrack", "-L", "-p", "tcp", "-s", CLIENT["A"], netns=lab.router)
    timeouts = [int(line.split()[2]) for line in out.splitlines()]
    assert len(timeouts) == 2
    assert all(4300 <= t <= 4321 for t in timeouts), timeouts
    after = {f.id for f in dump_flows(lab.router) if f.orig.proto == 6}
    assert len(after - before) == 2  # A's two entries are new ones


def _udp_flows(n: int, zone: int = 0) -> list[Flow]:
    return [
        Flow(
            CtTuple(Family.IPV4, 17, "10.7.0.1", "10.8.0.1", 1000 + i, 53),
            CtTuple(Family.IPV4, 17, "10.8.0.1", "10.7.0.1", 53, 1000 + i),
            zone=zone,
        )
        for i in range(n)
    ]


def _poll_until(events: CtEvents, count: int) -> tuple[list[CtChange], bool]:
    got: list[CtChange] = []
    lost = False
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        select.select([events.fileno()], [], [], deadline - time.monotonic())
        changes, was_lost = events.poll()
        got += changes
        lost |= was_lost
    return got, lost


def test_conntrack_events_report_new_and_destroy_with_zone(netns: str) -> None:
    with CtEvents(netns) as events, ConntrackSocket(netns) as ct:
        assert ct.create((f, 60) for f in _udp_flows(2, zone=5)) == (2, 0)
        created, lost = _poll_until(events, 2)
        assert not lost
        assert [(c.new, c.gone, c.flow.zone) for c in created] == [(True, False, 5)] * 2
        assert {c.flow.orig.sport for c in created} == {1000, 1001}
        live = ct.dump()
        assert ct.delete(live).deleted == 2
        destroyed, _ = _poll_until(events, 2)
        assert {(c.gone, c.flow.id) for c in destroyed} == {(True, f.id) for f in live}


def test_conntrack_event_loss_is_reported_not_silent(netns: str) -> None:
    # NETLINK_NO_ENOBUFS hides the overflow from recv(); the drop counter must not.
    with CtEvents(netns, rcvbuf=65_536) as events, ConntrackSocket(netns) as ct:
        ct.create((f, 60) for f in _udp_flows(3000))
        _, lost = _poll_until(events, 3000)
        assert lost
        assert events.lost >= 1
        assert len(events.dump()) == 3000  # what the caller re-reads after a loss


def test_conntrack_events_open_on_entry_close_once_and_reopen(netns: str) -> None:
    events = CtEvents(netns)
    with pytest.raises(KernelError) as before:
        events.poll()  # built, not opened
    assert before.value.errno == errno.EBADF
    with events:
        fd = events.fileno()
        os.fstat(fd)
    with pytest.raises(KernelError) as after:
        events.fileno()
    assert after.value.errno == errno.EBADF
    reused = os.open(os.devnull, os.O_RDONLY)  # may take the freed number
    try:
        events.close()  # a second close leaves it alone
        os.fstat(reused)
    finally:
        os.close(reused)
    with events, ConntrackSocket(netns) as ct:  # opens again, subscribed again
        ct.create((f, 60) for f in _udp_flows(1))
        created, lost = _poll_until(events, 1)
        assert [c.new for c in created] == [True] and not lost


def test_a_queue_read_marks_the_overflow_and_never_waits(netns: str) -> None:
    # No NETLINK_NO_ENOBUFS here: the kernel reports the overflow on the next read.
    new_entries = 1 << (NFNLGRP_CONNTRACK_NEW - 1)
    nl = NetlinkSocket(
        NETLINK_NETFILTER,
        netns,
        groups=new_entries,
        rcvbuf=65_536,
        operation="watch ct",
        nonblocking=True,
    )
    with nl, ConntrackSocket(netns) as ct:
        ct.create((f, 60) for f in _udp_flows(3000))  # events are queued as it runs
        got = list(nl.queued(100_000))
        assert None in got
        assert 0 < sum(buf is not None for buf in got) < 3000
        assert list(nl.queued(10)) == []  # empty: returns at once
    with pytest.raises(KernelError) as info:
        list(nl.queued(1))
    assert (info.value.operation, info.value.errno) == ("watch ct", errno.EBADF)


def test_reinjected_entry_carries_a_window_scaled_bulk_stream(lab: Lab) -> None:
    """A full-speed masqueraded download (window scaling on, as Linux always
    negotiates) survives delete + re-create byte-exact, with no reset.

    The re-created entry has lost the handshake, so conntrack does not know the
    window scale factors: with strict window tracking every scaled window looks
    ~128x too small, the next full-size flight is "out of window", the packet is
    INVALID, skips de-NAT and reaches the router's own stack, which answers RST
    (the failure found in the VM demo). Re-created TCP entries are therefore
    marked liberal, as the kernel marks every offloaded TCP flow and every
    mid-stream pickup."""
    total = 24 << 20
    with entered(lab.server):
        listener = socket.create_server(("0.0.0.0", 6001))
    with entered(lab.clients["A"]):
        client = socket.create_connection((SERVER, 6001), timeout=5)
    conn, _ = listener.accept()
    sent_error: list[BaseException] = []

    def send() -> None:
        try:
            block = bytes(range(256)) * 256
            for _ in range(total // len(block)):
                conn.sendall(block)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            sent_error.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    try:
        client.settimeout(10)
        sender.start()
        got = bytearray()
        while len(got) < total // 8:
            got += client.recv(1 << 20)
        report = teardown_flows_via({"p1"}, netns=lab.router, only_offloaded=False)
        assert report.recreated >= 1
        while chunk := client.recv(1 << 20):
            got += chunk
        sender.join(10)
        assert not sent_error, sent_error
        assert len(got) == total
        assert bytes(got) == (bytes(range(256)) * 256) * (total // 65536)
    finally:
        for s in (client, conn, listener):
            s.close()

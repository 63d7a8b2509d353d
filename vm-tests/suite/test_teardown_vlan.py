"""Teardown + re-create of a masqueraded, offloaded TCP stream on a VLAN bridge port.

Regression for the reset found by the ``make demo`` driver (topology ``vlan_port``:
nsr1's br0 has the VLAN device lan0.10 as its port; wan0 masqueraded). After our
teardown (conntrack delete + re-create, kernel/ctnetlink) the stream resumed for
~0.1 s and was then reset. Cause: the re-created entry has lost the handshake, so
conntrack did not know the window scale factors; strictly tracked, the next
full-size flight from the server was out of window, hence INVALID, skipped de-NAT,
reached nsr1's own stack as traffic for 10.0.2.1 and was answered with a RST.
Fixed twice over: re-created TCP entries are liberal, as the kernel makes every
offloaded TCP flow (kernel/ctnetlink/conntrack.py), and the NAT guard drops
INVALID non-SYN TCP from outside (core/render.py). The scenario makes the
re-created entry meet the first packets (a stall during the teardown, as after a
host move), keeps them on the classic path (``min_packets``, as the example
router config; the kernel makes an entry liberal when it offloads it) and uses the
largest window scale, so that losing the scale factor always shows. The host netns test
``test_reinjected_entry_carries_a_window_scaled_bulk_stream`` shows the same on
the host kernel; here it runs with real flowtables and the VLAN port.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from topology import (
    NSR,
    TcpStream,
    Topology,
    build_topology,
    link_mac,
    nft,
    nft_apply,
    sysctl,
    wait_offloaded,
)

from controlplane.core.flowselect import Selector
from controlplane.kernel.ctnetlink.teardown import teardown_flows_via, teardown_selected
from controlplane.kernel.netns import entered
from controlplane.loader import parse_config
from controlplane.service.ruleset import apply

MiB = 1 << 20
ETH_P_ALL = 0x0003


class RstSniffer:
    """Every TCP RST seen on any device of a namespace (AF_PACKET), as text."""

    def __init__(self, netns: str) -> None:
        with entered(netns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.settimeout(0.2)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pkt, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            # Untagged IPv4 only: VLAN tags are stripped (hw-accel) before AF_PACKET.
            if len(pkt) < 54 or pkt[12:14] != b"\x08\x00" or pkt[23] != socket.IPPROTO_TCP:
                continue
            ihl = (pkt[14] & 0x0F) * 4
            tcp = 14 + ihl
            if pkt[tcp + 13] & 0x04:
                sport, dport = struct.unpack_from(">HH", pkt, tcp)
                src, dst = socket.inet_ntoa(pkt[26:30]), socket.inet_ntoa(pkt[30:34])
                way = "out" if addr[2] == socket.PACKET_OUTGOING else "in"
                self.seen.append(f"{addr[0]} {way} {src}:{sport} > {dst}:{dport} RST")

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        return self.seen


# Nothing reaches nsr1's conntrack while the teardown runs, as when the host has
# just moved (the stream stalls in retransmission backoff): the re-create then
# always wins, and the first packets after it meet the re-created entry (at full
# speed a packet usually re-creates the entry first, via mid-stream pickup).
STALL = """
table netdev stall {
    chain in {
        type filter hook ingress devices = { lan0, wan0 } priority -500;
        drop
    }
}
"""


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = build_topology("vlan_port")
    # The largest window scale (14): a window tracked without the scale factor is
    # then a few bytes, so strict tracking of a re-created entry fails at once
    # instead of only when a flight outgrows it (TCG rates rarely get there).
    sysctl(t.ns1, net__ipv4__tcp_rmem="4096 131072 1073741824")
    cfg = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": list(t.flow_devices)}],
        # As the example router config: the first packets of an entry stay on the
        # classic path. A re-created entry starts at 0 packets, so conntrack tracks
        # its window until it is offloaded again (offloading makes it liberal).
        "policies": [{"name": "all", "flowtable": "ft", "protocols": ["tcp"], "min_packets": 2}],
        "nat": {"masquerade": [{"oifname": t.wan_dev}]},
    }
    apply(parse_config(cfg), NSR)
    yield t
    t.teardown()


@pytest.mark.parametrize("how", ["mac", "devices"])
def test_masqueraded_stream_survives_teardown_on_a_vlan_port(topo: Topology, how: str) -> None:
    """A full-speed masqueraded download ns2 -> ns1, offloaded through the VLAN port,
    torn down twice (``flows teardown --mac`` / the agent's device teardown, each a
    delete + re-create): every byte arrives in order, no RST crosses nsr1."""
    sniffer = RstSniffer(NSR)
    stream = TcpStream(topo.ns1, topo.ns2, topo.addr("ns2")).start()
    try:
        stream.wait_received(4 * MiB)
        for _ in range(2):
            wait_offloaded(NSR, stream)
            nft_apply(NSR, STALL)
            try:
                if how == "mac":
                    mac = link_mac(topo.ns1, topo.ns1_dev)
                    rep = teardown_selected(Selector.parse("mac", mac), NSR)
                    assert len(rep.selected) == rep.deleted == rep.recreated == 1, rep
                else:
                    via = teardown_flows_via({"lan0.10"}, NSR)
                    assert via.matched == via.deleted == via.recreated == 1, via
            finally:
                nft(NSR, "delete", "table", "netdev", "stall")
            # Resuming is not enough (the reset came after ~60-190 ms of traffic):
            # several MiB must cross the re-created entry.
            stream.wait_received(stream.received + 8 * MiB, timeout=30)
    finally:
        result = stream.stop()
        rsts = sniffer.close()
        print("TCP RSTs seen on nsr1:", rsts or "none")  # shown if the test fails
    assert result.error is None, (result.error, rsts)
    assert result.intact, result
    assert rsts == [], rsts

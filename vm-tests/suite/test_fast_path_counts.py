"""Forwarded packets and bytes by path (issue 14): with a flowtable's ``counter``
flag the kernel adds each fast-path packet to its conntrack entry's counters;
the agent's observer turns their growth into ``offloadctl_forwarded_*_total``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from topology import NS1, NS2, NSR, MiB, TcpStream, Topology, in_netns, offloadctl

from controlplane.kernel.ctnetlink.accounting import entry_counters
from controlplane.loader import load_config
from controlplane.service.kernel_view import KernelObserver

SIZE = 16 * MiB


def _sysctl(ns: str, name: str, value: str) -> None:
    def write() -> None:
        Path("/proc/sys/net/netfilter", name).write_text(value)

    in_netns(ns, write)


@pytest.mark.parametrize("acct", ["0", "1"])
def test_fast_path_bytes_are_counted_with_the_counter_flag(
    seed: Topology, tmp_path: Path, acct: str
) -> None:
    cfg_path = tmp_path / "counted.json"
    cfg_path.write_text(
        json.dumps(
            {
                "version": 1,
                "flowtables": [
                    {"name": "ft", "devices": ["wan0"], "bridges": ["br0"], "counter": True}
                ],
                "policies": [{"name": "p", "flowtable": "ft"}],
                "nat": {"masquerade": [{"oifname": seed.wan_dev}]},
            }
        )
    )
    _sysctl(NSR, "nf_conntrack_acct", acct)
    offloadctl("apply", str(cfg_path), "--netns", NSR)
    cfg = load_config(cfg_path)
    observer = KernelObserver()
    stream = TcpStream(NS1, NS2, seed.addr("ns2", 4)).start()
    try:
        stream.wait_received(1 * MiB)
        received_before = stream.received
        first = observer.observe(cfg, NSR)  # the entry is seen offloaded: its baseline
        # The first reading happened somewhere inside observe(): the router had
        # forwarded at most what the sender had handed to its socket by now (plus
        # the one chunk whose send() may not have been added to ``sent`` yet).
        forwarded_at_most = stream.sent + stream.chunk
        entries_first = entry_counters(NSR)
        stream.wait_received(forwarded_at_most + SIZE)
        # ...and by the second reading at least what has arrived by now.
        forwarded_at_least = stream.received
        second = observer.observe(cfg, NSR)
        sent_after = stream.sent + stream.chunk
        entries_second = entry_counters(NSR)
    finally:
        result = stream.stop()
    assert result.intact, result
    print(f"acct={acct} entries {entries_first} -> {entries_second}")
    print(f"acct={acct} forwarded {first.forwarded} -> {second.forwarded}")
    fast = second.forwarded["fast"]["bytes"] - first.forwarded["fast"]["bytes"]
    classic = second.forwarded["classic"]["bytes"] - first.forwarded["classic"]["bytes"]
    assert entries_second, "no offloaded entry"
    assert classic < SIZE / 20, (fast, classic)
    if acct == "0":
        # The kernel fact docs/agent.md states: the counter flag alone adds nothing,
        # an entry needs the accounting extension (nf_conntrack_acct=1 at creation).
        assert set(entries_second.values()) == {(0, 0)} and fast == 0, entries_second
    else:
        # Between the two readings the fast path carried at least the payload that
        # provably crossed the router between them (>= SIZE), and at most what was
        # sent between them plus IP/TCP headers and the ACKs of the reply direction
        # (the entry counts both directions' IP bytes, ~5% here).
        carried_at_least = forwarded_at_least - forwarded_at_most
        carried_at_most = sent_after - received_before
        assert carried_at_least >= SIZE
        assert carried_at_least <= fast <= carried_at_most * 1.25, (
            carried_at_least,
            fast,
            carried_at_most,
        )

"""Cross-checks of the test bed itself, with hand-written nft rulesets (no project code).

For each topology: a multi-MiB TCP transfer through the router arrives intact, conntrack shows
the flow as [OFFLOAD] while it is open, and a forward-hook counter saw only a handful of its
packets. A control run without ``flow add`` shows the same counter sees the whole transfer, so
"few packets" really means "fast path".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Literal

import pytest
from topology import (
    NS1,
    NS2,
    NSR,
    CtEntry,
    MiB,
    TcpStream,
    Topology,
    add_observer,
    delete_namespaces,
    flow_entries,
    nft_apply,
    nft_counter,
    ns_run,
    observer_counter,
    offloadctl,
    run,
    tcp_transfer,
    wait_offloaded,
)

SIZE = 8 * MiB
MAX_SLOW_PATH_PACKETS = 100


def ruleset(topo: Topology, *, offload: bool = True) -> str:
    devices = ", ".join(topo.flow_devices)
    flow = "meta l4proto tcp flow add @ft" if offload else ""
    return f"""
table inet xcheck {{
    flowtable ft {{
        hook ingress priority filter
        devices = {{ {devices} }}
    }}
    counter fwd_tcp {{ }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        meta l4proto tcp counter name "fwd_tcp"
        {flow}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{topo.wan_dev}" masquerade
    }}
}}
"""


def test_boot_smoke() -> None:
    """The guest has what the suite needs: flowtables, 8021q, bridge VLAN filtering, tools."""
    for mod in ("nf_flow_table", "nf_flow_table_inet", "nft_flow_offload", "8021q", "bridge"):
        assert os.path.isdir(f"/sys/module/{mod}"), f"module {mod} not loaded"
    ns = "smoke"
    delete_namespaces([ns])
    run("ip", "netns", "add", ns)
    try:
        nft_apply(
            ns,
            "table inet t {\n  flowtable f {\n    hook ingress priority 0\n"
            "    devices = { lo }\n  }\n}\n",
        )
        assert "flowtable f" in ns_run(ns, "nft", "list", "ruleset")
        ns_run(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ns_run(ns, "ip", "link", "add", "link", "v0", "name", "v0.10", "type", "vlan", "id", "10")
        ns_run(ns, "ip", "link", "add", "b0", "type", "bridge", "vlan_filtering", "1")
        ns_run(ns, "conntrack", "-L")
    finally:
        delete_namespaces([ns])


CASES = [
    # (topology kind, IP version, who connects, data direction)
    pytest.param("bridge", 4, "ns1", "download", id="seed-v4"),
    pytest.param("bridge", 6, "ns1", "download", id="seed-v6"),
    pytest.param("bridge", 4, "ns2", "upload", id="seed-v4-from-wan"),
    pytest.param("routed", 4, "ns1", "download", id="routed-v4"),
    pytest.param("routed", 6, "ns1", "upload", id="routed-v6-upload"),
    pytest.param("vlan_port", 4, "ns1", "download", id="vlan-port-v4"),
    pytest.param("vlan_port", 6, "ns1", "download", id="vlan-port-v6"),
    pytest.param("vlan_filtering", 4, "ns1", "download", id="vlan-filtering-v4"),
    pytest.param("vlan_filtering", 6, "ns1", "download", id="vlan-filtering-v6"),
    pytest.param("qinq", 4, "ns1", "download", id="qinq-v4"),
    pytest.param("qinq", 6, "ns1", "download", id="qinq-v6"),
    pytest.param("qinq_bridge", 4, "ns1", "download", id="qinq-bridge-v4"),
]


@pytest.mark.parametrize(("kind", "v", "client", "direction"), CASES)
def test_offload(
    make_topology: Callable[[str], Topology],
    kind: str,
    v: Literal[4, 6],
    client: str,
    direction: Literal["download", "upload"],
) -> None:
    topo = make_topology(kind)
    nft_apply(NSR, ruleset(topo))
    add_observer(NSR)
    if client == "ns1":
        client_ns, server_ns, server = NS1, NS2, topo.addr("ns2", v)
    else:
        client_ns, server_ns, server = NS2, NS1, topo.addr("ns1", v)
    seen: dict[str, list[CtEntry]] = {}

    def inspect(res: Any) -> None:
        seen["entries"] = flow_entries(NSR, res)

    res = tcp_transfer(
        client_ns, server_ns, server, SIZE, direction=direction, before_close=inspect
    )
    fwd = nft_counter(NSR, "xcheck", "fwd_tcp")
    obs = observer_counter(NSR)
    print(
        f"\n{kind} v{v} {client}-initiated {direction}: {res.received} B in {res.seconds:.2f}s "
        f"({res.mbit_s:.0f} Mbit/s); forward chain {fwd.packets} pkts / {fwd.bytes} B; "
        f"observer {obs.packets} pkts; conntrack: {[e.raw for e in seen['entries']]}"
    )
    assert res.ok, res
    entries = seen["entries"]
    assert len(entries) == 1, entries
    assert entries[0].offloaded, entries[0].raw
    assert fwd.packets < MAX_SLOW_PATH_PACKETS, fwd
    assert fwd.bytes < SIZE // 20, fwd
    assert obs.packets < MAX_SLOW_PATH_PACKETS, obs


def test_control_without_flow_add(seed: Topology) -> None:
    """Without ``flow add`` the same counters see the whole transfer (the classic path)."""
    nft_apply(NSR, ruleset(seed, offload=False))
    add_observer(NSR)
    entries: list[CtEntry] = []
    res = tcp_transfer(
        NS1,
        NS2,
        seed.addr("ns2"),
        SIZE,
        before_close=lambda r: entries.extend(flow_entries(NSR, r)),
    )
    fwd = nft_counter(NSR, "xcheck", "fwd_tcp")
    obs = observer_counter(NSR)
    print(f"\ncontrol: forward chain {fwd.packets} pkts / {fwd.bytes} B, observer {obs.packets}")
    assert res.ok, res
    assert len(entries) == 1 and not entries[0].offloaded, entries
    assert fwd.bytes >= SIZE, fwd
    # (the closing FIN/ACKs may pass between the two counter reads)
    assert abs(obs.packets - fwd.packets) <= 4, (obs, fwd)


def test_background_stream_offloaded(seed: Topology) -> None:
    """A long-running stream is offloaded while it runs and arrives intact."""
    nft_apply(NSR, ruleset(seed))
    with TcpStream(NS1, NS2, seed.addr("ns2")) as stream:
        stream.wait_received(2 * MiB)
        wait_offloaded(NSR, stream)
        before = nft_counter(NSR, "xcheck", "fwd_tcp")
        entries = flow_entries(NSR, stream)
        stream.wait_received(stream.received + 4 * MiB)
        after = nft_counter(NSR, "xcheck", "fwd_tcp")
        result = stream.stop()
    print(f"\nstream: {result.received} B in {result.seconds:.1f}s; fwd {before} -> {after}")
    assert result.intact, result
    assert len(entries) == 1 and entries[0].offloaded, entries
    assert after.packets - before.packets < 10, (before, after)


def test_project_cli_starts_in_guest() -> None:
    """The project's CLI imports and runs in the guest (the scenario tests drive it)."""
    t0 = time.monotonic()
    out = offloadctl("--help").stdout
    print(f"\noffloadctl --help: {time.monotonic() - t0:.2f}s")
    assert "apply" in out

"""Every direction on the fast path (issue 9), configured only through ``offloadctl apply``.

``[OFFLOAD]`` in conntrack is per flow; only the forward hook, counted per
input device, shows which direction really bypasses the classic path. Each
scenario runs a download (data enters on wan0, ACKs enter on the LAN side:
thousands of packets each way) and asserts a handful of forward-hook packets
*per direction*, counted by an observer table of our own (independent of the
project's ruleset) and by the project's ``classic_in_*`` counters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
from topology import (
    NS1,
    NS2,
    NSR,
    MiB,
    TcpStream,
    Topology,
    add_observer,
    find_conntrack,
    ip_batch,
    nft,
    nft_apply,
    nft_json,
    ns_run,
    observer_counter,
    offloadctl,
    tcp_transfer,
    wait_offloaded,
)

from controlplane.core.devices import classic_path_report

SIZE = 4 * MiB
# Healthy: the handshake and the packets in flight before "flow add" (measured
# 0-6 per direction); the unhooked direction: thousands (one per ACK).
HANDFUL = 25
GOLDEN = Path(__file__).parents[2] / "nft" / "golden"


def write(tmp_path: Path, cfg: dict[str, Any]) -> str:
    p = tmp_path / "offload.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def bridges_only(topo: Topology, **extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": [topo.wan_dev], "bridges": [topo.bridge]}],
        "policies": [{"name": "lan-wan", "flowtable": "ft"}],
        "nat": {"masquerade": [{"oifname": topo.wan_dev}]},
        **extra,
    }


def observe_directions(topo: Topology) -> None:
    """Observer counters by the input device the forward hook sees (both directions)."""
    add_observer(NSR, counter="in_lan", match=f'meta l4proto tcp iifname "{topo.lan_dev}"')
    add_observer(NSR, counter="in_wan", match=f'meta l4proto tcp iifname "{topo.wan_dev}"')
    for name in ("in_lan", "in_wan"):
        nft(NSR, "reset", "counter", "inet", "observer", name)


def project_counters() -> dict[str, tuple[int, int]]:
    out = {}
    for item in nft_json(NSR, "list", "table", "inet", "offloadctl"):
        if "counter" in item:
            c = item["counter"]
            out[c["name"]] = (int(c["packets"]), int(c["bytes"]))
    return out


def flowtable_devices() -> set[str]:
    for item in nft_json(NSR, "list", "table", "inet", "offloadctl"):
        if "flowtable" in item:
            dev = item["flowtable"].get("dev", [])
            return {dev} if isinstance(dev, str) else set(dev)
    raise LookupError("no flowtable")


def download(topo: Topology, v: Literal[4, 6] = 4, size: int = SIZE) -> tuple[bool, int, int]:
    """(offloaded while open, classic packets LAN→WAN, classic packets WAN→LAN)."""
    seen: dict[str, Any] = {}
    for name in ("in_lan", "in_wan"):
        nft(NSR, "reset", "counter", "inet", "observer", name)

    def before_close(res: Any) -> None:
        seen["ct"] = find_conntrack(NSR, sport=res.client[1], dport=res.server[1], family=v)

    res = tcp_transfer(NS1, NS2, topo.addr("ns2", v), size, before_close=before_close)
    assert res.intact, res
    offloaded = any(e.offloaded for e in seen["ct"])
    lan = observer_counter(NSR, "in_lan").packets
    wan = observer_counter(NSR, "in_wan").packets
    print(f"{topo.kind} v{v}: forward hook saw {lan} LAN->WAN, {wan} WAN->LAN packets")
    return offloaded, lan, wan


@pytest.mark.parametrize("topology", ["vlan_port", "qinq_bridge", "vlan_filtering"], indirect=True)
def test_bridges_only_offloads_both_directions(topology: Topology, tmp_path: Path) -> None:
    out = offloadctl("apply", write(tmp_path, bridges_only(topology)), "--netns", NSR)
    assert out.returncode == 0
    # The VLAN/QinQ port contributes the real device under it, never itself.
    assert flowtable_devices() == {"lan0", "wan0"}
    observe_directions(topology)
    before = project_counters()
    for v in (4, 6):
        offloaded, lan, wan = download(topology, v)
        assert offloaded
        assert lan <= HANDFUL, f"v{v}: {lan} LAN→WAN packets took the forward hook"
        assert wan <= HANDFUL, f"v{v}: {wan} WAN→LAN packets took the forward hook"
    report = classic_path_report(project_counters(), threshold=HANDFUL, baseline=before)
    assert report and not [r for r in report if r.suspect], report


@pytest.mark.parametrize("topology", ["vlan_port"], indirect=True)
def test_listing_the_vlan_port_leaves_a_direction_on_the_classic_path(
    topology: Topology, tmp_path: Path
) -> None:
    """The old bug, reproduced by hand: lan0.10 (a bridge port) in the flowtable
    instead of lan0. conntrack says [OFFLOAD], the LAN→WAN direction does not
    bypass the forward hook, and the project's per-input counter (status'
    report) flags exactly that ingress. Then offloadctl, given the same listing,
    resolves lan0.10 to lan0 with a note and both directions offload."""
    cfg = bridges_only(topology)
    cfg["flowtables"][0] = {"name": "ft", "devices": ["lan0.10", "wan0"]}
    path = write(tmp_path, cfg)
    rendered = offloadctl("render", path, "--netns", NSR)
    assert "lan0.10 is a VLAN device and a port of br0" in rendered.stderr
    assert '"lan0", "wan0"' in rendered.stdout
    offloadctl("apply", path, "--netns", NSR)
    assert flowtable_devices() == {"lan0", "wan0"}
    observe_directions(topology)
    offloaded, lan, wan = download(topology)
    assert offloaded and lan <= HANDFUL and wan <= HANDFUL, (lan, wan)

    # Now the kernel state the old offloadctl wrote: hook lan0.10, not lan0.
    nft(NSR, "add", "flowtable", "inet", "offloadctl", "ft", '{ devices = { "lan0.10" } ; }')
    nft(NSR, "delete", "flowtable", "inet", "offloadctl", "ft", '{ devices = { "lan0" } ; }')
    assert flowtable_devices() == {"lan0.10", "wan0"}
    observe_directions(topology)
    before = project_counters()
    offloaded, lan, wan = download(topology, size=2 * SIZE)
    assert offloaded, "conntrack still says [OFFLOAD] for the flow"
    # Every ACK from the LAN takes the classic path (measured: 230 for 4 MiB).
    assert lan > 4 * HANDFUL, f"LAN→WAN should stay on the classic path, saw {lan}"
    assert wan <= HANDFUL
    report = classic_path_report(project_counters(), threshold=HANDFUL, baseline=before)
    print("unhooked lan0:", report)
    assert [r.ingress for r in report if r.suspect] == ["br0"], report

    # status (--json) says the same, and a live [OFFLOAD] flow entering through
    # br0 is not counted as offloaded.
    with TcpStream(NS1, NS2, topology.addr("ns2")) as stream:
        stream.wait_received(4 * MiB)
        wait_offloaded(NSR, stream)
        info = json.loads(offloadctl("status", "--netns", NSR, "--json").stdout)
    assert [r["ingress"] for r in info["classic_path_by_input"] if r["suspect"]] == ["br0"]
    assert info["offloaded_one_direction"] >= 1, info


@pytest.mark.parametrize("topology", ["routed"], indirect=True)
def test_pmtu_smaller_mtu_on_wan(topology: Topology, tmp_path: Path) -> None:
    """wan0 at MTU 1280: ns1's full-size segments exceed it; the fast path
    hands them to the classic path, which answers "fragmentation needed" /
    "packet too big"; ns1 lowers its path MTU, the upload arrives byte-exact and
    the flow is offloaded."""
    cfg = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": ["lan0", "wan0"]}],
        "policies": [{"name": "all", "flowtable": "ft"}],
    }
    offloadctl("apply", write(tmp_path, cfg), "--netns", NSR)
    # Only the router's side of the WAN link is small: ns2 (MTU 1500) still
    # advertises MSS 1460, so ns1's segments exceed wan0 and the router must
    # tell ns1 (ns2 only sends small ACKs back, which fit).
    ip_batch(NSR, ["link set wan0 mtu 1280"])
    nft_apply(
        NSR,
        """
table inet pmtu {
    counter frag_needed { }
    counter too_big { }
    chain out {
        type filter hook output priority 0; policy accept;
        icmp type destination-unreachable icmp code frag-needed counter name "frag_needed"
        icmpv6 type packet-too-big counter name "too_big"
    }
}
""",
    )
    observe_directions(topology)
    cases: tuple[tuple[Literal[4, 6], str], ...] = ((4, "frag_needed"), (6, "too_big"))
    for v, counter in cases:
        seen: dict[str, Any] = {}

        def before_close(res: Any, v: Literal[4, 6] = v, seen: dict[str, Any] = seen) -> None:
            seen["ct"] = find_conntrack(NSR, sport=res.client[1], dport=res.server[1], family=v)

        res = tcp_transfer(
            NS1,
            NS2,
            topology.addr("ns2", v),
            SIZE,
            direction="upload",
            before_close=before_close,
        )
        assert res.intact, res
        assert any(e.offloaded for e in seen["ct"]), seen
        icmp = nft_json(NSR, "list", "counter", "inet", "pmtu", counter)
        sent = next(i["counter"]["packets"] for i in icmp if "counter" in i)
        assert sent >= 1, f"v{v}: the router sent no {counter}"
    lan = observer_counter(NSR, "in_lan").packets
    assert lan <= 4 * HANDFUL, f"{lan} LAN→WAN packets on the classic path"


@pytest.mark.parametrize("topology", ["routed"], indirect=True)
def test_new_goldens_load_in_the_kernel(topology: Topology) -> None:
    """The issue-9 examples' renderings (both grammars) pass the kernel's check."""
    for stem in (
        "selftest-ports",
        "default-deny",
        "dnat-daddr",
        "vlan-bridge-port",
        "forward-accept",
    ):
        ns_run(NSR, "nft", "-c", "-f", str(GOLDEN / f"{stem}.nft"))
        ns_run(NSR, "nft", "-c", "-j", "-f", str(GOLDEN / f"{stem}.json"))

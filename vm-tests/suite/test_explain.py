"""``offloadctl explain`` names each reason with a real flow (issue 14), and none
for a flow on the fast path; ``flows`` and ``status`` agree with conntrack.

Few CLI calls per test (each costs seconds under TCG): one ``explain --ip`` of
all the client's flows answers for every scenario running at once.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from topology import (
    NS1,
    NS2,
    NSR,
    MiB,
    TcpStream,
    Topology,
    netns_socket,
    offloadctl,
    wait_for,
    wait_offloaded,
)

FAST, SLOW, NONE = 5201, 5202, 5203
NO_HOST = "10.0.2.99"  # on wan0's subnet, nobody answers: a SYN stays unreplied


def write(tmp_path: Path, cfg: dict[str, Any], name: str = "offload.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return str(p)


def explain(*args: str) -> tuple[int, list[dict[str, Any]]]:
    res = offloadctl("explain", *args, "--netns", NSR, "--json", check=False)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, [json.loads(line) for line in res.stdout.splitlines()]


def codes(doc: dict[str, Any]) -> list[str]:
    return [r["code"] for r in doc["reasons"]]


def by_dport(docs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out = {}
    for doc in docs:
        m = re.search(r":(\d+) id=", doc["subject"])
        assert m, doc
        out[int(m.group(1))] = doc
    return out


@pytest.mark.parametrize("topology", ["bridge"], indirect=True)
def test_each_reason_with_a_real_flow(topology: Topology, tmp_path: Path) -> None:
    wan = topology.wan_dev
    cfg = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": [wan], "bridges": [topology.bridge]}],
        "policies": [
            {"name": "fast", "flowtable": "ft", "protocols": ["tcp"], "dport": [FAST]},
            {
                "name": "slow",
                "flowtable": "ft",
                "protocols": ["tcp"],
                "dport": [SLOW],
                "min_packets": 2**32 - 1,
            },
        ],
        "nat": {"masquerade": [{"oifname": wan}]},
    }
    path = write(tmp_path, cfg)
    offloadctl("apply", path, "--netns", NSR)
    server = topology.addr("ns2")
    streams = [
        TcpStream(NS1, NS2, server, port=p, rate=256 * 1024).start() for p in (FAST, SLOW, NONE)
    ]
    syn = netns_socket(NS1, socket.AF_INET)
    syn.setblocking(False)
    try:
        syn.connect_ex((NO_HOST, FAST))  # SYN_SENT [UNREPLIED] in the router
        for s in streams:
            s.wait_received(256 * 1024)
        wait_offloaded(NSR, streams[0])
        code, docs = explain("--ip", topology.addr("ns1"), "--config", path)
        flows = offloadctl("flows", "--netns", NSR, "--json").stdout
        status = offloadctl("status", "--netns", NSR).stdout
    finally:
        syn.close()
        for s in streams:
            s.stop()
    assert code == 1  # some are not on the fast path
    seen = {}
    for doc in docs:
        m = re.search(r"-> ([\d.]+):(\d+) id=", doc["subject"])
        assert m, doc
        seen[(m.group(1), int(m.group(2)))] = doc
    fast = seen[(server, FAST)]
    assert fast["fast_path"] and fast["offloaded"] and codes(fast) == [], fast
    slow = seen[(server, SLOW)]
    assert codes(slow) == ["min_packets"], slow
    count = slow["reasons"][0]["evidence"]["packets"]
    assert isinstance(count, int) and count > 100, slow  # the count so far, from conntrack
    assert f"seen so far: {count}" in slow["reasons"][0]["text"]
    none = seen[(server, NONE)]
    assert codes(none) == ["policy", "policy"], none
    assert {r["evidence"]["policy"] for r in none["reasons"]} == {"fast", "slow"}
    assert f"dport: {NONE} not in {FAST}" in none["reasons"][0]["text"]
    unreplied = seen[(NO_HOST, FAST)]
    assert codes(unreplied) == ["ct_state"], unreplied
    assert "no reply seen yet" in unreplied["reasons"][0]["text"]

    # flows: kernel truth, the same count status opens with.
    listed = [json.loads(line) for line in flows.splitlines()]
    offloaded = sum(1 for d in listed if d["offloaded"])
    assert offloaded >= 1 and any(d["dport"] == FAST and d["offloaded"] for d in listed)
    assert not any(d["dport"] in (SLOW, NONE) and d["offloaded"] for d in listed), listed
    first = status.splitlines()[0]
    assert first.startswith("verdict: kernel can offload; flowtable ft {"), first
    assert f"{offloaded} of {len(listed)} forwarded flows offloaded" in first, (first, listed)


@pytest.mark.parametrize("topology", ["vlan_port"], indirect=True)
def test_unhooked_vlan_port_then_classic_path_packets(topology: Topology, tmp_path: Path) -> None:
    """Only wan0 hooked: the LAN direction needs lan0, the real device under the
    VLAN bridge port lan0.10 (the derived set ``bridges: [br0]`` would give).
    Then the whole config: the flow offloaded before lan0 joined keeps that
    direction on the classic path, and the counter says so."""
    wan = topology.wan_dev
    partial = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": [wan]}],
        "policies": [{"name": "all", "flowtable": "ft"}],
        "nat": {"masquerade": [{"oifname": wan}]},
    }
    offloadctl("apply", write(tmp_path, partial), "--netns", NSR)
    stream = TcpStream(NS1, NS2, topology.addr("ns2"), port=FAST, rate=1 * MiB).start()
    try:
        stream.wait_received(1 * MiB)
        wait_offloaded(NSR, stream)
        code, docs = explain("--ip", topology.addr("ns2"))
        (doc,) = [d for d in docs if f":{FAST} id=" in d["subject"]]
        assert code == 1 and doc["offloaded"] and not doc["fast_path"]
        assert codes(doc) == ["device"], doc
        assert doc["reasons"][0]["evidence"]["needs"] == ["lan0"]
        assert "br0 > lan0.10 > lan0: the kernel hooks lan0" in doc["reasons"][0]["text"]
        dev = offloadctl("explain", "--dev", "lan0.10", "--netns", NSR, check=False)
        assert dev.returncode == 1
        assert "lan0.10 is a VLAN bridge port: the kernel hooks its real device lan0" in dev.stdout

        whole = dict(partial, flowtables=[{"name": "ft", "devices": [wan], "bridges": ["br0"]}])
        offloadctl("apply", write(tmp_path, whole, "whole.json"), "--netns", NSR)
        stream.wait_received(stream.received + 1 * MiB)  # ~360 ACKs enter through br0

        def classic_reason() -> dict[str, Any] | None:
            _, now = explain("--ip", topology.addr("ns2"))
            found = [d for d in now if f":{FAST} id=" in d["subject"]]
            return found[0] if found and codes(found[0]) == ["classic_path"] else None

        doc = wait_for(classic_reason, 60.0, what="classic_path reason")
        assert doc["reasons"][0]["evidence"]["ingress"] == "br0"
        assert doc["reasons"][0]["evidence"]["packets"] > 32
    finally:
        assert stream.stop().intact

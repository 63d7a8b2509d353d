"""The host agent with real flowtables (issue 10): a bridge port joins and leaves
the flowtable while an offloaded transfer runs, a reload leaves that flow on the
fast path, and a ``kill -9`` + restart sends nothing and keeps the flow.

"Stayed on the fast path" is read from a forward-hook counter in a separate
observer table (offloaded packets skip the forward hook), and "kept" from the
conntrack id; the transfer must arrive intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
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
    add_observer,
    find_conntrack,
    ip_batch,
    nft,
    observer_counter,
    offloadctl,
    reset_counter,
    wait_for,
)

from controlplane.agent import control, protocol


def config(topo: Topology, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": [topo.wan_dev], "bridges": ["br0"]}],
        "policies": [{"name": "lan-wan", "flowtable": "ft"}],
        "nat": {"masquerade": [{"oifname": topo.wan_dev}]},
    }
    cfg.update(extra)
    return cfg


class Agent:
    def __init__(self, tmp: Path) -> None:
        self.config = tmp / "agent.json"
        self.socket = tmp / "run" / "agent.sock"
        self.state = tmp / "state.json"
        self.log = tmp / "agent.log"
        self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, cfg: dict[str, Any]) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg))
        tmp.replace(self.config)

    def start(self) -> float:
        """Start and wait until the first apply is done; returns the seconds it took."""
        t0 = time.monotonic()
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "controlplane.cli", "agent", str(self.config),
                    "--netns", NSR, "--socket", str(self.socket), "--state-file",
                    str(self.state), "--watch-interval", "0", "--log-format", "json",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )  # fmt: skip
        wait_for(self._answers, timeout=180, interval=0.2, what="the agent's first status")
        return time.monotonic() - t0

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            return bool(self.call("status").ok)
        except control.AgentUnavailable:
            return False

    def call(self, op: str) -> protocol.Response:
        client = control.connect(self.socket)
        if client is None:
            raise control.AgentUnavailable("no socket yet")
        with client:
            return client.call(op, timeout=120)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    a.stop()


def flowtable_devices() -> set[str]:
    for item in json.loads(nft(NSR, "-j", "list", "flowtable", "inet", "offloadctl", "ft"))[
        "nftables"
    ]:
        if "flowtable" in item:
            devs = item["flowtable"].get("dev", [])
            return {devs} if isinstance(devs, str) else set(devs)
    return set()


def flowtable_handle() -> int:
    for item in json.loads(nft(NSR, "-j", "-a", "list", "flowtable", "inet", "offloadctl", "ft"))[
        "nftables"
    ]:
        if "flowtable" in item:
            return int(item["flowtable"]["handle"])
    raise LookupError("flowtable inet offloadctl ft not found")


def listed(port: str) -> bool:
    return port in flowtable_devices()


def classic_packets_during(seconds: float) -> int:
    reset_counter(NSR, "observer", "fwd_tcp")
    time.sleep(seconds)  # a window of traffic to observe, not a synchronisation
    return observer_counter(NSR, "fwd_tcp").packets


def the_flow(s: TcpStream) -> Any:
    entries = find_conntrack(NSR, dport=s.server[1])
    assert len(entries) == 1, [e.raw for e in entries]
    return entries[0]


def test_agent_port_join_reload_and_restart(seed: Topology, agent: Agent) -> None:
    agent.write(config(seed))
    startup = agent.start()
    assert flowtable_devices() == {"lan0", "wan0"}
    add_observer(NSR, counter="fwd_tcp")
    s = TcpStream(NS1, NS2, seed.addr("ns2")).start()
    s.wait_received(2 * MiB)
    wait_for(lambda: the_flow(s).offloaded, what="[OFFLOAD]")
    ct_id = the_flow(s).id

    # 1. New ports on br0 join the live flowtable (same handle: modified, not
    # re-created) and the running flow stays on the fast path with its id. The join
    # itself sends a few packets of the flow through the forward hook (the kernel's
    # doing, measured with plain nft: 1-3 ACKs per join, ~70 if br0's MAC changes,
    # hence high MACs for the new ports), so the check is a quiet window afterwards.
    handle = flowtable_handle()
    joins: list[float] = []
    after_ip: list[float] = []
    for i in range(3):
        ip_batch(
            NSR,
            [
                f"link add tap{i} address fe:ff:ff:ff:ff:0{i} type veth peer name tap{i}p",
                f"link set tap{i}p up",
            ],
        )
        t0 = time.monotonic()
        ip_batch(NSR, [f"link set tap{i} master br0 up"])
        after_ip.append(time.time())
        wait_for(partial(listed, f"tap{i}"), timeout=10, interval=0.005)
        joins.append(time.monotonic() - t0)
    assert flowtable_handle() == handle
    assert classic_packets_during(1.0) == 0
    assert the_flow(s).offloaded and the_flow(s).id == ct_id
    # 2. Ports that leave (released or deleted) leave the flowtable.
    ip_batch(NSR, ["link set tap0 nomaster", "link del tap1"])
    wait_for(lambda: not {"tap0", "tap1"} & flowtable_devices(), timeout=10, interval=0.01)
    assert flowtable_devices() == {"lan0", "wan0", "tap2"}
    assert flowtable_handle() == handle
    assert the_flow(s).offloaded and the_flow(s).id == ct_id

    # 3. Reload with an unrelated change: committed, the flow stays on the fast path.
    grown = config(seed)
    grown["nat"]["dnat"] = [{"iifname": "wan0", "port": 2222, "to": seed.addr("ns1")}]
    agent.write(grown)
    answer = agent.call("reload")
    assert answer.ok and answer.result["changed"], answer
    assert classic_packets_during(1.0) == 0
    assert the_flow(s).offloaded and the_flow(s).id == ct_id

    # 4. kill -9: the fast path keeps serving; a restart sends nothing (same handles).
    before = nft(NSR, "-a", "list", "table", "inet", "offloadctl")
    agent.kill9()
    got = s.received
    assert classic_packets_during(1.0) == 0
    assert s.received > got
    restart = agent.start()
    assert nft(NSR, "-a", "list", "table", "inet", "offloadctl") == before
    status = agent.call("status").result
    assert status["last_apply"]["changed"] is False
    assert the_flow(s).offloaded and the_flow(s).id == ct_id
    assert classic_packets_during(0.5) == 0

    result = s.stop(timeout=60)
    assert result.intact and result.error is None, result
    log = agent.log.read_text()
    assert "Traceback" not in log
    # The agent's own view of each join: its "committed" line for the new device,
    # against the moment 'ip link set master' returned (the event is sent before).
    commits = [
        datetime.strptime(d["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        for d in map(json.loads, log.splitlines())
        if d["event"] == "topology" and d["msg"].startswith("committed")
    ]
    agent_ms = [
        (min((c.timestamp() for c in commits if c.timestamp() >= t - 0.01), default=t) - t) * 1000
        for t in after_ip
    ]
    print(
        f"agent start {startup:.1f} s, restart {restart:.1f} s (TCG);"
        f" port join seen by the test {', '.join(f'{j * 1000:.0f}' for j in joins)} ms"
        f" (includes 'ip' and 'nft' process starts, ~0.2 s each under TCG);"
        f" committed by the agent {', '.join(f'{m:.0f}' for m in agent_ms)} ms after"
        " 'ip link set master' returned"
    )
    if os.environ.get("VMTEST_STRICT_TIMING") == "1":
        assert max(joins) < 0.1


# -- port join latency and devices vanishing mid-apply ---------------------------

#: What the VM meets (TCG, Python ~10x slower than on the host): measured p50
#: 49 ms, p99 78 ms over 100 joins on a quiet host, 96 / 167 ms while other VMs
#: and tests load it (bench_agent.py --join-latency). The bound keeps that
#: margin; the 100 ms goal is for a real host, which has no flowtables here.
JOIN_P50_BOUND = float(os.environ.get("VMTEST_JOIN_P50_BOUND", "0.2"))


def _topology_commits(log: Path) -> list[tuple[float, str]]:
    """(wall time, message) of the agent's topology decisions (JSON log)."""
    out = []
    for line in log.read_text().splitlines():
        d = json.loads(line)
        if d["event"] == "topology":
            ts = datetime.strptime(d["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            out.append((ts.timestamp(), d["msg"]))
    return out


def _iproute() -> Any:
    from pyroute2 import IPRoute

    from controlplane.kernel.netns import entered

    with entered(NSR):
        return IPRoute()


def bridge_ports(ipr: Any) -> set[str]:
    br = ipr.link_lookup(ifname="br0")[0]
    return {m.get("IFLA_IFNAME") for m in ipr.link("dump", master=br)}


def test_port_join_latency(seed: Topology, agent: Agent) -> None:
    """Ports join one at a time (RTM_NEWLINK sent in-process: no 'ip' start-up in
    the figure); each must be committed by the agent within the bound."""
    agent.write(config(seed))
    agent.start()
    joins = 20
    ip_batch(NSR, [f"link add j{i} type veth peer name j{i}p" for i in range(joins)])
    ipr = _iproute()
    br = ipr.link_lookup(ifname="br0")[0]
    lat = []
    for i in range(joins):
        idx = ipr.link_lookup(ifname=f"j{i}")[0]
        t0 = time.time()
        ipr.link("set", index=idx, master=br)

        def committed(name: str = f"j{i}", since: float = t0) -> float | None:
            for at, msg in _topology_commits(agent.log):
                if at >= since - 0.005 and ": + devices {" in msg and name in msg:
                    return at
            return None

        at = wait_for(committed, timeout=30, interval=0.005)
        assert at is not None
        lat.append(at - t0)
    ipr.close()
    assert {f"j{i}" for i in range(joins)} <= flowtable_devices()
    lat.sort()
    p50, worst = lat[len(lat) // 2], lat[-1]
    print(
        f"port join -> committed over {joins} joins (TCG): p50 {p50 * 1000:.0f} ms,"
        f" max {worst * 1000:.0f} ms (bound p50 < {JOIN_P50_BOUND * 1000:.0f} ms)"
    )
    assert p50 < JOIN_P50_BOUND
    # Joins after the first are planned against the table the agent's own last
    # commit left (ruleset generation unchanged: no listing). Leaves take the same
    # path; a wrong remembered table would make the kernel refuse (retries) or
    # leave it unlike the config, which a listing-based plan would show.
    ipr = _iproute()
    for i in range(0, joins, 2):
        ipr.link("set", index=ipr.link_lookup(ifname=f"j{i}")[0], master=0)
    expected = bridge_ports(ipr) | {seed.wan_dev}
    ipr.close()
    wait_for(lambda: flowtable_devices() == expected, timeout=60, interval=0.1, what="leaves")
    phases = [
        d.get("phases_ms") or {}
        for d in map(json.loads, agent.log.read_text().splitlines())
        if d["event"] == "topology" and d["msg"].startswith("committed")
    ]
    unlisted = sum(1 for ph in phases if "plan" in ph)
    print(f"{unlisted} of {len(phases)} topology commits planned without listing the table")
    assert unlisted >= joins // 2, phases
    assert not [m for _, m in _topology_commits(agent.log) if "refused" in m]
    assert "no changes" in offloadctl("plan", str(agent.config), "--netns", NSR).stdout


def test_device_deleted_during_apply(seed: Topology, agent: Agent) -> None:
    """Ports appear on br0 and vanish again while the agent re-plans (a container
    deleted mid-apply): the agent survives, logs its retries, and ends with the
    flowtable devices = the bridge's real ports + wan0."""
    import random

    agent.write(config(seed))
    agent.start()
    ipr = _iproute()
    br = ipr.link_lookup(ifname="br0")[0]
    rng = random.Random(10)
    deadline = time.monotonic() + 120
    i = 0
    while time.monotonic() < deadline:
        name = f"c{i}"
        ipr.link("add", ifname=name, kind="veth", peer=f"{name}p")
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, master=br, state="up")
        time.sleep(rng.uniform(0.0, 0.15))  # land the delete inside the agent's apply
        if rng.random() < 0.8:
            ipr.link("del", index=idx)
        i += 1
        refused = [m for _, m in _topology_commits(agent.log) if " refused, re-planning" in m]
        if i >= 30 and refused:
            break
    assert agent.proc is not None and agent.proc.poll() is None, agent.log.read_text()
    expected = bridge_ports(ipr) | {seed.wan_dev}
    ipr.close()
    wait_for(lambda: flowtable_devices() == expected, timeout=60, interval=0.2, what="devices")
    commits = _topology_commits(agent.log)
    retries = [m for _, m in commits if " refused, re-planning" in m]
    print(f"{i} ports added ({len(expected) - 2} kept); {len(retries)} retries: {retries[:2]}")
    assert retries, "no apply was refused: the deletion never landed mid-apply"
    assert agent.call("status").ok
    assert "Traceback" not in agent.log.read_text()

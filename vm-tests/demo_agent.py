"""`make demo`, VM part: the host agent keeping the flowtable fast path correct.

One driver process in the guest (Python start-up under TCG is slow): it builds the seed
topology, starts ``offloadctl agent`` with the example router config, and shows

1. flows offloaded: a forward-hook counter (separate observer table) against the bytes
   moved, next to the same transfer before any ruleset (everything on the classic path);
2. a new bridge port joining the flowtable (and ports leaving it), timed;
3. a host moving to that new port (its MAC re-appears there, as after a live migration or
   a Wi-Fi roam): with the agent's invalidation the stream recovers in milliseconds;
   with invalidation off the same move stalls it (the flow stays [OFFLOAD] on the old port)
   until the flow is torn down by hand;
4. the stream arriving intact, the agent's status and decision log.

Every figure goes to ``--out`` (JSON) for the summary table ``scripts/demo.sh`` prints.
Usage (in the VM): ``python vm-tests/demo_agent.py --out RESULTS/agent.json [--kind K]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "suite"))
sys.path.insert(0, str(REPO))

from topology import (  # noqa: E402
    NS1,
    NS2,
    NSR,
    MiB,
    TcpStream,
    Topology,
    add_observer,
    build_topology,
    find_conntrack,
    in_netns,
    ip_batch,
    ns_run,
    observer_counter,
    reset_counter,
    tcp_transfer,
    wait_for,
)

T0 = time.monotonic()
EXAMPLE = REPO / "examples" / "configs" / "router.yaml"
WORK = Path("/tmp/demo")
CONFIG = WORK / "agent.yaml"
AGENT_LOG = WORK / "agent.log"  # moved next to --out (the results share) in main()
STALL_WINDOW = 3.0  # seconds we watch a stalled stream before fixing it by hand
JOIN_PORTS = 5


def say(msg: str) -> None:
    print(f"  [vm +{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


def step(title: str) -> None:
    print(f"\n---- [vm +{time.monotonic() - T0:5.1f}s] {title}", flush=True)


# --------------------------------------------------------------------------- the agent


def agent_config(invalidation: bool = True) -> str:
    """The shipped router example, renamed onto the test bed (br-lan -> br0, 192.168.1/24
    -> 10.0.1/24); ``invalidation=False`` switches the invalidation section off."""
    text = EXAMPLE.read_text().replace("br-lan", "br0").replace("192.168.1.", "10.0.1.")
    if not invalidation:
        text = text.replace("enabled: true", "enabled: false")
    return text


class Agent:
    """``offloadctl agent`` in the router namespace (default socket and state paths)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        from controlplane.agent.control import default_socket_path

        self.socket = default_socket_path(NSR)

    def start(self) -> float:
        t0 = time.monotonic()
        with open(AGENT_LOG, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controlplane.cli",
                    "agent",
                    str(CONFIG),
                    "--netns",
                    NSR,
                    "--watch-interval",
                    "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=REPO,
            )
        wait_for(self._answers, timeout=240, interval=0.2, what="the agent's first answer")
        return time.monotonic() - t0

    def _answers(self) -> bool:
        from controlplane.agent.control import AgentUnavailable

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited {self.proc.returncode}:\n{AGENT_LOG.read_text()}")
        try:
            return bool(self.call("status")["pid"])
        except (AgentUnavailable, RuntimeError):
            return False

    def call(self, op: str) -> dict[str, Any]:
        from controlplane.agent import control

        client = control.connect(self.socket)
        if client is None:
            raise RuntimeError("no agent socket yet")
        with client:
            resp = client.call(op, timeout=120)
        if not resp.ok:
            raise RuntimeError(f"agent {op}: {resp.error_message}")
        return resp.result

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None

    def log_lines(self, *words: str) -> list[str]:
        lines = AGENT_LOG.read_text().splitlines() if AGENT_LOG.exists() else []
        return [ln for ln in lines if any(w in ln for w in words)]


# --------------------------------------------------------------------------- kernel views


class FlowtableView:
    """The flowtable's device set, read in-process (libnftables bound to the router netns)
    so a join can be timed at millisecond granularity without an ``nft`` process per poll."""

    def __init__(self, table: str = "offloadctl", name: str = "ft") -> None:
        import nftables

        self._nft = in_netns(NSR, nftables.Nftables)
        self._nft.set_json_output(True)
        # nft 1.0.6's JSON input cannot list one flowtable: the text command, JSON output.
        self._cmd = f"list flowtable inet {table} {name}"

    def devices(self) -> set[str]:
        rc, text, _err = self._nft.cmd(self._cmd)
        if rc != 0 or not text:
            return set()
        out = json.loads(text)
        for item in out["nftables"]:
            if "flowtable" in item:
                devs = item["flowtable"].get("dev", [])
                return {devs} if isinstance(devs, str) else set(devs)
        return set()


def fdb_port(mac: str) -> str:
    out = ns_run(NSR, "bridge", "fdb", "show", "br", "br0")
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == mac and "dev" in parts:
            return parts[parts.index("dev") + 1]
    return "?"


def the_flow(s: TcpStream) -> Any:
    entries = find_conntrack(NSR, dport=s.server[1])
    return entries[0] if entries else None


def mac_of(ns: str, dev: str) -> str:
    doc = json.loads(ns_run(ns, "ip", "-j", "link", "show", dev))
    return str(doc[0]["address"])


def announce(ns: str, dev: str, mac: str, ip: str) -> None:
    """A gratuitous ARP from DEV, as QEMU sends after a live migration (announce-self) or a
    station after roaming: the bridge learns the MAC on its new port (one FDB event)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, addr, b"\0" * 6, addr)
    frame = b"\xff" * 6 + hw + struct.pack("!H", 0x0806) + arp

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((dev, 0))
            s.send(frame)

    in_netns(ns, send)


# --------------------------------------------------------------------------- the story


class Demo:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.out: dict[str, Any] = {"kind": kind}
        self.topo: Topology
        self.agent = Agent()
        vlan = ".10" if kind == "vlan_port" else ""
        self.vlan = vlan
        # The host's first and second link (ns1 side), the router's new bridge port and
        # the device the flowtable must hook for it (a VLAN port's lower device).
        self.host_devs = (f"eth0{vlan}", f"eth1{vlan}")
        self.new_port, self.new_lower = f"lan1{vlan}", "lan1"

    def run(self) -> dict[str, Any]:
        WORK.mkdir(parents=True, exist_ok=True)
        try:
            self.topology()
            self.classic_baseline()
            self.start_agent()
            self.offload()
            self.port_join()
            self.host_move()
            self.finish()
        finally:
            self.out["agent_exit"] = self.agent.stop()
        return self.out

    def topology(self) -> None:
        step(f"seed topology ({self.kind}): ns1 -- br0 [nsr1 router, masquerade] wan0 -- ns2")
        t = time.monotonic()
        self.topo = build_topology(self.kind)
        say(
            f"built in {time.monotonic() - t:.1f} s: br0 ports {', '.join(self.topo.bridge_ports)}"
            f" (VLAN devices: {', '.join(self.topo.vlan_devices) or 'none'}), wan0 routed,"
            f" host ns1 {self.topo.addr('ns1')} on {self.topo.ns1_dev}, server ns2"
            f" {self.topo.addr('ns2')}"
        )
        add_observer(NSR, counter="fwd_tcp")
        say("observer: a separate table counting TCP in the forward hook (the classic path)")

    def classic_baseline(self) -> None:
        step("baseline, no offload: 8 MiB ns2 -> ns1, every byte crosses the forward hook")
        size = 8 * MiB
        res = tcp_transfer(NS1, NS2, self.topo.addr("ns2"), size)
        c = observer_counter(NSR, "fwd_tcp")
        say(f"intact {res.ok}; forward hook saw {c.packets} packets / {c.bytes} bytes")
        self.out["classic"] = {
            "bytes": size,
            "hook_packets": c.packets,
            "hook_bytes": c.bytes,
            "ok": res.ok,
            "mbit_s": res.mbit_s,
        }

    def start_agent(self) -> None:
        step("offloadctl agent CONFIG --netns nsr1 (examples/configs/router.yaml on br0)")
        CONFIG.write_text(agent_config())
        print("\n".join("    | " + ln for ln in CONFIG.read_text().splitlines()), flush=True)
        seconds = self.agent.start()
        st = self.agent.call("status")
        fts = st["kernel"]["flowtables"]
        say(f"agent pid {st['pid']} answered after {seconds:.1f} s (Python start-up under TCG)")
        say(f"flowtable devices: {fts}; invalidation enabled: {st['invalidation'].get('enabled')}")
        for line in self.agent.log_lines("apply: committed", "invalidation"):
            print("    agent:", line, flush=True)
        self.out["agent_start_s"] = seconds
        self.out["flowtable_at_start"] = fts

    def offload(self) -> None:
        step("offloaded: 16 MiB ns2 -> ns1 through the agent's flowtable")
        size = 16 * MiB
        reset_counter(NSR, "observer", "fwd_tcp")
        seen: dict[str, Any] = {}
        res = tcp_transfer(
            NS1,
            NS2,
            self.topo.addr("ns2"),
            size,
            before_close=lambda r: seen.update(ct=find_conntrack(NSR, sport=r.client[1])),
        )
        c = observer_counter(NSR, "fwd_tcp")
        offloaded = any(e.offloaded for e in seen.get("ct", []))
        for e in seen.get("ct", []):
            say(f"conntrack: {e.raw}")
        say(
            f"intact {res.ok}; forward hook saw {c.packets} packets / {c.bytes} bytes of"
            f" {size} moved ({res.mbit_s:.0f} Mbit/s under TCG)"
        )
        self.out["offload"] = {
            "bytes": size,
            "hook_packets": c.packets,
            "hook_bytes": c.bytes,
            "ok": res.ok,
            "offloaded": offloaded,
            "mbit_s": res.mbit_s,
        }

    def port_join(self) -> None:
        step(
            f"a new bridge port: {self.new_port} (the host's second link) joins br0;"
            f" then {JOIN_PORTS - 1} taps come and go"
        )
        view = FlowtableView()
        if "wan0" not in view.devices():
            raise RuntimeError(f"cannot read the flowtable in-process: {view.devices()}")
        # The host's second link: veth lan1 <-> ns1:eth1 (+ VLAN 10 on both ends if the
        # topology is VLAN-ported). Created detached; joining br0 is the timed event.
        run_r = ["link add lan1 type veth peer name eth1 netns " + NS1, "link set lan1 up"]
        run_h = ["link set eth1 up"]
        if self.vlan:
            run_r += ["link add link lan1 name lan1.10 type vlan id 10", "link set lan1.10 up"]
            run_h += ["link add link eth1 name eth1.10 type vlan id 10", "link set eth1.10 up"]
        ip_batch(NSR, run_r)
        ip_batch(NS1, run_h)
        taps = [f"tap{i}" for i in range(1, JOIN_PORTS)]
        ip_batch(
            NSR,
            [
                c
                for t in taps
                for c in (
                    f"link add {t} type veth peer name {t}p",
                    f"link set {t}p up",
                    f"link set {t} up",
                )
            ],
        )
        joins: list[float] = []
        for port, listed in [(self.new_port, self.new_lower)] + [(t, t) for t in taps]:
            joins.append(self._timed(view, port, listed, join=True))
        say(
            "joined: "
            + ", ".join(
                f"{p} {ms:.0f} ms" for p, ms in zip([self.new_port, *taps], joins, strict=True)
            )
        )
        leaves = [self._timed(view, t, t, join=False) for t in taps[:2]]
        ip_batch(NSR, [f"link del {t}" for t in taps[2:]])
        wait_for(
            lambda: not set(taps) & view.devices(),
            timeout=20,
            interval=0.01,
            what="deleted taps leaving the flowtable",
        )
        say(
            f"left (nomaster): {', '.join(f'{ms:.0f} ms' for ms in leaves)};"
            f" deleted taps gone too; flowtable now {sorted(view.devices())}"
        )
        self.out["join_ms"] = joins
        self.out["leave_ms"] = leaves
        self.out["flowtable_after_join"] = sorted(view.devices())

    def _timed(self, view: FlowtableView, port: str, listed: str, *, join: bool) -> float:
        """Milliseconds from the kernel's ACK of ``master br0`` / ``nomaster`` (an in-process
        netlink request in the router netns) to the flowtable listing (or not) ``listed``."""
        from pyroute2 import IPRoute

        def go() -> float:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=port)[0]
                br = ipr.link_lookup(ifname="br0")[0]
                t0 = time.monotonic()
                ipr.link("set", index=idx, master=br if join else 0)
                deadline = t0 + 60
                while (listed in view.devices()) != join:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{listed} {'join' if join else 'leave'}: >60 s; flowtable"
                            f" {sorted(view.devices())}"
                        )
                    time.sleep(0.002)
                return (time.monotonic() - t0) * 1000

        # The view's libnftables context lives in the router netns already; polling it from
        # this thread is fine (the binding is per context, not per thread).
        return in_netns(NSR, go)

    def _move(self, frm: str, to: str) -> None:
        """The host leaves FRM for TO keeping its MAC and IP (FRM gets a fresh MAC and stays
        up: the old bridge port keeps its carrier, as a roaming station's old radio does).

        A VLAN device's parent changes MAC with it: a frame for the host's MAC arriving on
        the old link must be dropped there (PACKET_OTHERHOST), not accepted by the weak host
        model through the parent's old address."""
        ip = self.topo.addr("ns1")
        fresh = ":".join(["02", "00", "00"] + [f"{random.randrange(256):02x}" for _ in range(3)])
        macs = [f"link set {d} address {fresh}" for d in dict.fromkeys([frm.split(".")[0], frm])]
        macs += [f"link set {d} address {self.mac}" for d in dict.fromkeys([to.split(".")[0], to])]
        ip_batch(
            NS1,
            [
                f"addr del {ip}/24 dev {frm}",
                *macs,
                f"addr add {ip}/24 dev {to}",
                f"route replace default via {self.topo.addr('lan')} dev {to}",
            ],
        )

    def _recovery(self, s: TcpStream, timeout: float) -> float | None:
        """Announce the host on its new port; seconds until the stream moves again."""
        ip = self.topo.addr("ns1")
        got = s.received
        t0 = time.monotonic()
        announce(NS1, self._dev_now, self.mac, ip)
        while time.monotonic() - t0 < timeout:
            if s.received > got + 64 * 1024:
                return time.monotonic() - t0
            time.sleep(0.002)
        return None

    def host_move(self) -> None:
        old, new = self.host_devs
        self.mac = mac_of(NS1, old)
        step(
            f"the host moves: {old} (br0 port lan0{self.vlan}) -> {new} (port {self.new_port}),"
            f" same MAC {self.mac} and IP, under a live download"
        )
        s = TcpStream(NS1, NS2, self.topo.addr("ns2"), rate=8 * MiB, timeout=90).start()
        s.wait_received(2 * MiB, timeout=60)
        wait_for(lambda: (f := self.the(s)) and f.offloaded, timeout=20, what="[OFFLOAD]")
        ct_before = self.the(s).id
        say(
            f"stream {s.client} -> {s.server} offloaded (conntrack id {ct_before});"
            f" FDB: {self.mac} on {fdb_port(self.mac)}"
        )
        inv0 = self.agent.call("status").get("invalidation", {})

        # 1. With the agent's invalidation (the example config has it on).
        self._move(old, new)
        self._dev_now = new
        with_inv = self._recovery(s, timeout=10)
        inv1 = self.agent.call("status").get("invalidation", {})
        torn = inv1.get("flows_torn_down", 0) - inv0.get("flows_torn_down", 0)
        say(
            f"FDB now: {self.mac} on {fdb_port(self.mac)}; agent tore down {torn} flow(s);"
            + (
                f" stream moving again {with_inv * 1000:.0f} ms after the announce"
                if with_inv is not None
                else " stream did NOT recover within 10 s"
            )
        )
        for line in self.agent.log_lines("invalidation: stale", "invalidation: tore down")[-2:]:
            print("    agent:", line, flush=True)
        r1 = s.stop(timeout=60 if s.alive else 5)
        say(f"stream done: {r1.received} bytes, intact {r1.intact}, error {r1.error}")

        # 2. The same move back with invalidation switched off (reload, no kernel change),
        # with a fresh stream offloaded through the host's new port.
        CONFIG.write_text(agent_config(invalidation=False))
        rel = self.agent.call("reload")
        say(f"reload with invalidation.enabled: false -> changed: {rel['changed']}")
        s = TcpStream(NS1, NS2, self.topo.addr("ns2"), rate=8 * MiB, timeout=90).start()
        s.wait_received(2 * MiB, timeout=60)
        wait_for(lambda: (f := self.the(s)) and f.offloaded, timeout=20, what="[OFFLOAD]")
        say(f"new stream {s.client} -> {s.server} offloaded via {self.new_port}; moving back")
        self._move(new, old)
        self._dev_now = old
        without = self._recovery(s, timeout=STALL_WINDOW)
        flow = self.the(s)
        stalled_offloaded = bool(flow and flow.offloaded)
        say(
            f"FDB now: {self.mac} on {fdb_port(self.mac)}, but the flow still"
            f" {'[OFFLOAD]s to the old port' if stalled_offloaded else 'is not offloaded'}:"
            + (
                f" stream stalled for the whole {STALL_WINDOW:.0f} s window"
                if without is None
                else f" recovered after {without * 1000:.0f} ms (!)"
            )
        )
        # The operator's way out without the agent: tear the MAC's flows down by hand, i.e.
        # `offloadctl flows teardown --mac MAC`, here through the same library call: a CLI
        # start costs seconds under TCG, and every second of stall pushes the server's next
        # retransmission (exponential backoff) further out.
        from controlplane.core.flowselect import Selector
        from controlplane.kernel.ctnetlink.teardown import teardown_selected

        got = s.received
        t = time.monotonic()
        rep = teardown_selected(Selector.parse("mac", self.mac), NSR)
        say(
            f"offloadctl flows teardown --mac {self.mac} --netns {NSR}: {len(rep.selected)}"
            f" selected, {rep.deleted} deleted, {rep.recreated} re-created"
            f" ({rep.elapsed * 1000:.0f} ms)"
        )
        deadline = t + 20
        while s.received <= got + 64 * 1024 and s.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        recovered = s.received > got + 64 * 1024
        after = time.monotonic() - t
        manual_stall = after + STALL_WINDOW if recovered else None
        say(
            f"moving again {after:.1f} s after the manual teardown (TCP backoff)"
            if recovered
            else f"NOT moving {after:.1f} s after the manual teardown (alive: {s.alive})"
        )
        CONFIG.write_text(agent_config())
        self.agent.call("reload")
        r = s.stop(timeout=60 if s.alive else 5)
        say(f"stream done: {r.received} bytes, intact {r.intact}, error {r.error}")
        self.out["move"] = {
            "with_invalidation_ms": None if with_inv is None else with_inv * 1000,
            "torn_down": torn,
            "without_recovered_ms": None if without is None else without * 1000,
            "without_window_s": STALL_WINDOW,
            "without_still_offloaded": stalled_offloaded,
            "manual_stall_s": manual_stall,
            "stream_intact": r.intact and r1.intact,
            "stream_bytes": r.received + r1.received,
            "stream_error": r1.error or r.error,
        }

    def the(self, s: TcpStream) -> Any:
        return the_flow(s)

    def finish(self) -> None:
        step("the agent's view: offloadctl status --netns nsr1 (same text, from the socket)")
        from controlplane.cli.agent import status_lines

        st = self.agent.call("status")
        for line in status_lines(st):
            print("    " + line, flush=True)
        inv = st.get("invalidation", {})
        self.out["invalidation"] = inv
        self.out["tracebacks"] = "Traceback" in AGENT_LOG.read_text()
        rc = self.agent.stop()
        left = ns_run(NSR, "nft", "list", "flowtables")
        say(f"SIGTERM: agent exited {rc}; table left serving: {'flowtable ft' in left}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", default="vlan_port", choices=("bridge", "vlan_port"))
    args = p.parse_args()
    global AGENT_LOG
    AGENT_LOG = args.out.parent / "agent.log"
    AGENT_LOG.unlink(missing_ok=True)
    demo = Demo(args.kind)
    try:
        out = demo.run()
        out["ok"] = True
    except Exception as exc:  # the summary must say what broke, and the exit code too
        import traceback

        traceback.print_exc()
        if AGENT_LOG.exists():
            print(f"---- the agent's log ({AGENT_LOG}), last lines:")
            print("\n".join(AGENT_LOG.read_text().splitlines()[-25:]))
            with contextlib.suppress(Exception):
                print(ns_run(NSR, "ip", "-br", "link"), ns_run(NSR, "nft", "list", "flowtables"))
        out = demo.out | {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["seconds"] = time.monotonic() - T0
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(f"\n---- [vm +{out['seconds']:5.1f}s] VM part {'done' if out['ok'] else 'FAILED'}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

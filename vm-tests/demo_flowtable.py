"""`make demo`, VM part: the flowtable fast path on Debian's stock kernel, driven by offloadctl."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))

from topology import (  # noqa: E402
    NS1,
    NS2,
    NSR,
    MiB,
    TcpStream,
    add_observer,
    build_topology,
    find_conntrack,
    observer_counter,
    offloadctl,
    reset_counter,
    tcp_transfer,
    wait_for,
)


def step(title: str) -> None:
    print(f"\n---- {title}", flush=True)


def sh_offloadctl(*args: str) -> None:
    print(f"$ offloadctl {' '.join(args)}")
    res = offloadctl(*args, check=False)
    print((res.stdout + res.stderr).rstrip(), flush=True)


def main() -> int:
    step("seed topology: ns1 <-> nsr1 (br0 with port lan0; masquerade on wan0) <-> ns2")
    topo = build_topology("bridge")
    cfg = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}],
        "policies": [{"name": "lan-wan", "flowtable": "ft"}],
        "nat": {"masquerade": [{"oifname": "wan0"}]},
    }
    path = Path("/tmp/demo.json")
    path.write_text(json.dumps(cfg, indent=2))
    print(path.read_text())
    sh_offloadctl("apply", str(path), "--netns", NSR)
    sh_offloadctl("plan", str(path), "--netns", NSR)
    add_observer(NSR, counter="fwd_tcp")

    step("16 MiB download ns2 -> ns1 through the router")
    seen: dict[str, object] = {}
    res = tcp_transfer(
        NS1,
        NS2,
        topo.addr("ns2"),
        16 * MiB,
        before_close=lambda r: seen.update(ct=find_conntrack(NSR, sport=r.client[1])),
    )
    c = observer_counter(NSR, "fwd_tcp")
    print(f"intact: {res.ok}  ({res.mbit_s:.0f} Mbit/s under TCG)")
    for e in seen["ct"]:  # type: ignore[attr-defined]
        print("conntrack:", e.raw)
    print(f"forward hook (classic path) saw {c.packets} packets / {c.bytes} bytes of {16 * MiB}")

    step(
        "a live stream stays offloaded while the config grows, and is torn down when its"
        " device leaves the flowtable"
    )
    s = TcpStream(NS1, NS2, topo.addr("ns2"), direction="download", rate=4 * MiB).start()
    s.wait_received(2 * MiB, timeout=30)
    wait_for(lambda: any(e.offloaded for e in find_conntrack(NSR, dport=s.server[1])), timeout=10)
    reset_counter(NSR, "observer", "fwd_tcp")
    cfg["nat"]["dnat"] = [{"iifname": "wan0", "port": 2222, "to": "10.0.1.2", "to_port": 22}]  # type: ignore[index]
    path.write_text(json.dumps(cfg))
    sh_offloadctl("apply", str(path), "--netns", NSR)
    time.sleep(1)
    print(
        f"classic-path packets of the stream during the re-apply: "
        f"{observer_counter(NSR, 'fwd_tcp').packets}"
    )
    cfg["flowtables"] = [{"name": "ft", "devices": ["wan0"]}]
    path.write_text(json.dumps(cfg))
    sh_offloadctl("apply", str(path), "--netns", NSR)
    time.sleep(1)
    print("conntrack now:", find_conntrack(NSR, dport=s.server[1])[0].raw)
    r = s.stop(timeout=30)
    print(f"stream finished on the classic path: {r.received} bytes, intact={r.intact}")
    sh_offloadctl("status", "--netns", NSR)
    topo.teardown()
    return 0 if res.ok and r.intact else 1


if __name__ == "__main__":
    sys.exit(main())

"""Agent benchmark (host): unchanged reload of a 1,000-rule config, and RSS under churn.

1. ``offloadctl reload`` of an unchanged 1,000-rule config, as a user times it
   (control socket round trip: parse + plan against the kernel, nothing sent),
   against raw ``nft -f`` of the same ruleset into an empty namespace, in the
   same run. "Nothing sent" is checked: the table's listing with handles is
   byte-identical afterwards.
2. Agent RSS before and after an hour-equivalent of churn on a bridge of its
   namespace: 10,000 port joins/leaves and 100,000 FDB events (the watcher and
   invalidation engine run; link events make the agent re-plan its devices).

Port join latency needs flowtables (the VM): vm-tests/suite/test_agent.py
prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.agent import control

PY = [sys.executable, "-m", "controlplane.cli"]


def sh(*args: str, input: str | None = None) -> str:
    res = subprocess.run(args, capture_output=True, text=True, check=False, input=input)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {res.stderr.strip()[:2000]}")
    return res.stdout


def make_config(rules: int) -> dict[str, Any]:
    return {
        "version": 1,
        "nat": {
            "masquerade": [{"oifname": "wan0"}],
            "dnat": [
                {
                    "iifname": "wan0",
                    "port": 1024 + i,
                    "to": f"10.0.{i // 250}.{i % 250 + 1}",
                    "to_port": 80,
                }
                for i in range(rules)
            ],
        },
        "invalidation": {"enabled": True},
    }


def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--joins", type=int, default=5000, help="join+leave cycles (2 events each)")
    ap.add_argument("--fdb", type=int, default=50000, help="FDB add+del pairs (2 events each)")
    args = ap.parse_args()

    ns, base = f"bench-agent-{uuid.uuid4().hex[:6]}", f"bench-raw-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-", dir="/run"))
    cfg_path = tmp / "agent.json"
    cfg_path.write_text(json.dumps(make_config(args.rules)))
    sock = tmp / "agent.sock"
    proc = None
    try:
        for n in (ns, base):
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "add", "wan0", "type", "veth", "peer", "name", "lan0")
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        with open(tmp / "agent.log", "wb") as log:
            proc = subprocess.Popen(
                [*PY, "agent", str(cfg_path), "--netns", ns, "--socket", str(sock),
                 "--state-file", str(tmp / "state.json"), "--watch-interval", "0"],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

        def call(op: str) -> Any:
            client = control.connect(sock)
            if client is None:
                return None
            with client:
                return client.call(op, timeout=600)

        def ready() -> bool:
            try:
                return call("status") is not None
            except control.AgentUnavailable:
                return False

        wait_until(ready, 120, "the agent")

        # -- 1. unchanged reload vs raw nft -f ---------------------------------
        text = sh(*PY, "render", str(cfg_path), "--format", "nft")
        before = sh("ip", "netns", "exec", ns, "nft", "-a", "list", "table", "inet", "offloadctl")
        reloads = []
        for _ in range(args.reloads):
            t0 = time.perf_counter()
            resp = call("reload")
            reloads.append(time.perf_counter() - t0)
            assert resp.ok and resp.result["changed"] is False, resp
        after = sh("ip", "netns", "exec", ns, "nft", "-a", "list", "table", "inet", "offloadctl")
        assert after == before, "an unchanged reload changed the table"
        raws = []
        for _ in range(5):
            t0 = time.perf_counter()
            sh("ip", "netns", "exec", base, "nft", "-f", "-", input=text)
            raws.append(time.perf_counter() - t0)
            sh("ip", "netns", "exec", base, "nft", "delete", "table", "inet", "offloadctl")
        reload_ms, raw_ms = statistics.median(reloads) * 1000, statistics.median(raws) * 1000

        # -- 2. RSS under churn ------------------------------------------------
        rss0, _ = rss_kib(proc.pid)
        t0 = time.perf_counter()
        batch = []
        for i in range(args.joins):
            batch += [
                f"link add p{i} type veth peer name q{i}",
                f"link set p{i} master br0",
                f"link del p{i}",
            ]
        sh("ip", "-n", ns, "-batch", "-", input="\n".join(batch) + "\n")
        sh("ip", "-n", ns, "link", "add", "port0", "type", "veth", "peer", "name", "peer0")
        sh("ip", "-n", ns, "link", "set", "port0", "master", "br0", "up")
        fdb = []
        for i in range(args.fdb):
            mac = f"02:00:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
            fdb.append(f"fdb add {mac} dev port0 master static")
        fdb += [line.replace("fdb add", "fdb del") for line in fdb]
        sh("ip", "netns", "exec", ns, "bridge", "-batch", "-", input="\n".join(fdb) + "\n")
        churn_s = time.perf_counter() - t0
        wait_until(lambda: call("status") is not None, 600, "the agent after the churn")
        status = call("status").result
        rss1, hwm = rss_kib(proc.pid)
        inv = status["invalidation"]

        print(f"agent, host, {args.rules}-rule config (median; baseline in the same run)")
        print(f"{'measure':<44} {'value':>12} {'baseline':>12} {'ratio':>7}")
        print(
            f"{'unchanged reload (control socket)':<44} {reload_ms:>10.1f}ms"
            f" {raw_ms:>10.1f}ms {reload_ms / raw_ms:>6.2f}x  (raw nft -f, fresh)"
        )
        print(f"{'  table identical after reloads':<44} {'yes':>12}")
        print(f"{'RSS before churn':<44} {rss0 / 1024:>10.1f}MB")
        print(
            f"{'RSS after churn':<44} {rss1 / 1024:>10.1f}MB"
            f"   (peak {hwm / 1024:.1f} MB; {2 * args.joins} port joins/leaves +"
            f" {2 * args.fdb} FDB events in {churn_s:.1f} s)"
        )
        print(
            f"{'  watcher events / overflows / resyncs':<44}"
            f" {inv.get('events', 0)} / {inv.get('overflows', 0)} / {inv.get('resyncs', 0)}"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        for n in (ns, base):
            subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()

"""Agent benchmark (host): unchanged reload of a 1,000-rule config, and RSS under churn.

1. ``offloadctl reload`` of an unchanged 1,000-rule config, as a user times it
   (control socket round trip: parse + plan against the kernel, nothing sent),
   against raw ``nft -f`` of the same ruleset into an empty namespace, in the
   same run. "Nothing sent" is checked: the table's listing with handles is
   byte-identical afterwards.
2. Agent RSS before and after an hour-equivalent of churn on a bridge of its
   namespace: 10,000 port joins/leaves and 100,000 FDB events (the watcher and
   invalidation engine run; link events make the agent re-plan its devices).

3. ``--join-latency N`` (needs flowtables: the VM, ``vm-tests/run -- python
   bench/bench_agent.py --join-latency 100``): N bridge ports joining, one at a
   time, from the ``RTM_NEWLINK`` request (pyroute2, in-process: no ``ip``
   start-up in the figure) to the agent's commit of that device (its JSON log
   line), p50/p99, against the same device change sent raw through
   libnftables (``add flowtable ... devices = { X }``) in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workloads import port_forwards  # bench/ is the script's directory

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
        "nat": port_forwards(rules),
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


def tear_down_lab(agent: subprocess.Popen[bytes] | None, netns: tuple[str, ...], tmp: Path) -> None:
    if agent is not None:
        agent.terminate()
        agent.wait(60)
    for n in netns:
        subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _commit_times(log: Path, seen: int) -> tuple[dict[str, tuple[float, dict[str, Any]]], int]:
    """Devices the agent committed into the flowtable -> (wall-clock time of that
    log line, the fields of the topology commit line before it: timing breakdown),
    from the JSON lines after ``seen`` bytes."""
    from datetime import UTC, datetime

    out: dict[str, tuple[float, dict[str, Any]]] = {}
    data = log.read_bytes()
    end = data.rfind(b"\n") + 1
    commit: dict[str, Any] = {}
    for line in data[seen:end].splitlines():
        doc = json.loads(line)
        msg = doc.get("msg", "")
        if doc.get("event") != "topology":
            continue
        if msg.startswith("committed"):
            commit = doc
        elif ": + devices {" in msg:
            ts = datetime.strptime(doc["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            for dev in msg.split("{", 1)[1].rstrip("} ").split(", "):
                out[dev.strip()] = (ts.timestamp(), commit)
    return out, end


def _breakdown(samples: list[tuple[float, float, dict[str, Any]]]) -> list[tuple[str, float]]:
    """Median milliseconds per stage of a join, from (request time, commit line
    time, commit fields) samples; the stages add up to about the median total."""
    stages: dict[str, list[float]] = {}

    def add(name: str, ms: float) -> None:
        stages.setdefault(name, []).append(ms)

    for t0, t_done, doc in samples:
        read_at = float(doc.get("event_read_at", 0.0))
        if not read_at:
            continue
        add("request -> agent reads the link event", (read_at - t0) * 1000)
        add("  watcher decode + engine", float(doc.get("handle_ms", 0.0)))
        add("  wait before re-plan", float(doc.get("wait_ms", 0.0)))
        for name, ms in dict(doc.get("phases_ms") or {}).items():
            add(f"  apply: {name}", float(ms))
        add("  apply total (incl. reuseport, logging)", float(doc.get("ms", 0.0)))
        add("request -> device line logged", (t_done - t0) * 1000)
    return [(name, statistics.median(v)) for name, v in stages.items()]


def join_latency(joins: int) -> None:
    from pyroute2 import IPRoute

    from controlplane.kernel.netns import entered
    from controlplane.kernel.nft.libnft import Nft

    ns, base = f"bench-join-{uuid.uuid4().hex[:6]}", f"bench-joinraw-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-join-", dir="/run"))
    cfg = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}],
        "policies": [{"name": "lan-wan", "flowtable": "ft"}],
        "nat": {"masquerade": [{"oifname": "wan0"}]},
        "invalidation": {"enabled": True},
    }
    (tmp / "agent.json").write_text(json.dumps(cfg))
    log = tmp / "agent.log"
    proc = None
    try:
        for n in (ns, base):
            sh("ip", "netns", "add", n)
            batch = ["link add wan0 type veth peer name wan1", "link add br0 type bridge"]
            batch += ["link set br0 up"]
            batch += [f"link add tap{i} type veth peer name tap{i}p" for i in range(joins)]
            sh("ip", "-n", n, "-batch", "-", input="\n".join(batch) + "\n")
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [*PY, "agent", str(tmp / "agent.json"), "--netns", ns, "--socket",
                 str(tmp / "agent.sock"), "--state-file", str(tmp / "state.json"),
                 "--watch-interval", "0", "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

        def ready() -> bool:
            try:
                client = control.connect(tmp / "agent.sock")
            except control.AgentUnavailable:
                return False
            if client is None:
                return False
            with client:
                return bool(client.call("status", timeout=300).ok)

        wait_until(ready, 300, "the agent")
        with entered(ns):
            ipr = IPRoute()
        br = ipr.link_lookup(ifname="br0")[0]
        seen = log.stat().st_size
        lat: list[float] = []
        samples: list[tuple[float, float, dict[str, Any]]] = []
        for i in range(joins):
            idx = ipr.link_lookup(ifname=f"tap{i}")[0]
            t0 = time.time()
            ipr.link("set", index=idx, master=br)
            deadline = time.monotonic() + 30
            while True:
                got, seen_now = _commit_times(log, seen)
                if f"tap{i}" in got:
                    done_at, fields = got[f"tap{i}"]
                    lat.append(done_at - t0)
                    samples.append((t0, done_at, fields))
                    seen = seen_now
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"tap{i} not committed within 30 s; see {log}")
                time.sleep(0.002)
        ipr.close()
        # Baseline: the same one-device change straight through libnftables.
        raw_nft = Nft(base)
        rc = raw_nft._ctx.cmd(
            "add table inet offloadctl\n"
            "add flowtable inet offloadctl ft { hook ingress priority 0; devices = { wan0 }; }"
        )[0]
        assert rc == 0, "baseline flowtable"
        raw: list[float] = []
        for i in range(joins):
            t0 = time.perf_counter()
            rc = raw_nft._ctx.cmd(
                f"add flowtable inet offloadctl ft {{ hook ingress priority 0;"
                f" devices = {{ tap{i} }}; }}"
            )[0]
            raw.append(time.perf_counter() - t0)
            assert rc == 0, f"baseline add tap{i}"
        p50, p99 = _percentile(lat, 0.5) * 1000, _percentile(lat, 0.99) * 1000
        b50, b99 = _percentile(raw, 0.5) * 1000, _percentile(raw, 0.99) * 1000
        print(f"agent port join latency, {joins} joins (baseline in the same run)")
        print(f"{'measure':<44} {'value':>12} {'baseline':>12} {'ratio':>7}")
        print(f"{'join -> committed, p50':<44} {p50:>10.1f}ms {b50:>10.1f}ms {p50 / b50:>6.1f}x")
        print(f"{'join -> committed, p99':<44} {p99:>10.1f}ms {b99:>10.1f}ms {p99 / b99:>6.1f}x")
        print(f"{'  max':<44} {max(lat) * 1000:>10.1f}ms   (baseline: raw libnftables add)")
        print("where a join's time goes (median per stage):")
        for name, ms in _breakdown(samples):
            print(f"  {name:<52} {ms:>8.1f}ms")
    finally:
        tear_down_lab(proc, (ns, base), tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--join-latency", type=int, default=0, metavar="N",
        help="only measure N port joins (needs flowtables: run in the VM)",
    )  # fmt: skip
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--joins", type=int, default=5000, help="join+leave cycles (2 events each)")
    ap.add_argument("--fdb", type=int, default=50000, help="FDB add+del pairs (2 events each)")
    args = ap.parse_args()
    if args.join_latency:
        join_latency(args.join_latency)
        return

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
        tear_down_lab(proc, (ns, base), tmp)


if __name__ == "__main__":
    main()

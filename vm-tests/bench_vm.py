"""VM benchmark (``make bench-vm``), one boot: fast path vs classic forwarding throughput,
and apply time of a 1,000-device / 1,000-rule config vs raw ``nft -f``.

Throughput under TCG is noisy: runs alternate (fast, classic, fast, ...) and we report
min / median / max of each and the ratio of medians.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))
sys.path.insert(0, str(HERE.parent))

from topology import NS1, NS2, NSR, MiB, build_topology, tcp_transfer  # noqa: E402

from controlplane.loader import parse_config  # noqa: E402
from controlplane.service import ruleset  # noqa: E402

RUNS = 5
SIZE = 64 * MiB


def throughput() -> None:
    topo = build_topology("bridge")
    base = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": list(topo.flow_devices)}],
        "nat": {"masquerade": [{"oifname": "wan0"}]},
    }
    fast_cfg = parse_config({**base, "policies": [{"name": "all", "flowtable": "ft"}]})
    classic_cfg = parse_config(base)
    fast: list[float] = []
    classic: list[float] = []
    for _ in range(RUNS):
        for cfg, out in ((fast_cfg, fast), (classic_cfg, classic)):
            ruleset.apply(cfg, NSR)
            res = tcp_transfer(NS1, NS2, topo.addr("ns2"), SIZE)
            assert res.ok, res
            out.append(res.mbit_s)
    topo.teardown()
    print(
        f"\nforwarding throughput, {SIZE // MiB} MiB TCP transfers, {RUNS} alternating runs"
        " (Mbit/s, QEMU/TCG)"
    )
    print(f"{'path':<30}{'min':>9}{'median':>9}{'max':>9}")
    for name, xs in (("flowtable fast path", fast), ("classic forwarding", classic)):
        print(f"{name:<30}{min(xs):>9.0f}{statistics.median(xs):>9.0f}{max(xs):>9.0f}")
    ratios = [f / c for f, c in zip(fast, classic, strict=True)]
    print(
        f"fast/classic ratio: median {statistics.median(fast) / statistics.median(classic):.2f}x"
        f" (per pair min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
    )


def apply_time() -> None:
    subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "bench" / "bench_apply.py"),
            "--rules",
            "1000",
            "--devices",
            "1000",
            "--runs",
            "5",
        ],
        check=True,
    )


def main() -> int:
    throughput()
    apply_time()
    return 0


if __name__ == "__main__":
    sys.exit(main())

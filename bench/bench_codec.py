"""Netlink decoding cost: our codecs vs pyroute2's, µs per message, same run (no root).

The messages are the recorded kernel bytes of tests/unit/data/rtnl.json (links,
neighbours, FDB entries, routes, conntrack entries). Per kind, each message is
decoded ``--loops`` times by

- ours: ``kernel/rtnl/codec.decode`` (``kernel/ctnetlink/conntrack.decode_entry``),
  to the typed change the watcher and the snapshot use;
- pyroute2: its message class's ``decode()`` alone (``ifinfmsg``, ``ndmsg``,
  ``rtmsg``, ``nfct_msg``), not even the step to our types: the baseline is
  generous to it.

Best of ``--runs`` per row. Why it matters (docs/netlink.md): the kernel emits
tens of thousands of FDB events per second in a MAC storm; the decoder's cost
per event bounds the rate the watcher keeps up with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netlink.rtnl.ndmsg import ndmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

from controlplane.kernel.ctnetlink.conntrack import decode_entry  # noqa: E402
from controlplane.kernel.netlink import NLMSGHDR  # noqa: E402
from controlplane.kernel.rtnl.codec import decode  # noqa: E402

DATA = ROOT / "tests" / "unit" / "data" / "rtnl.json"
# kind → (pyroute2 class, rows' label); route lookups are route messages too.
KINDS: dict[str, tuple[Any, str]] = {
    "link dump": (ifinfmsg, "RTM_NEWLINK"),
    "neigh dump": (ndmsg, "RTM_NEWNEIGH (ARP/NDP)"),
    "fdb dump": (ndmsg, "RTM_NEWNEIGH (bridge FDB)"),
    "route dump": (rtmsg, "RTM_NEWROUTE"),
    "conntrack dump": (nfct_msg, "IPCTNL_MSG_CT_NEW"),
}


def _ours(what: str) -> Callable[[bytes], object]:
    if what == "conntrack dump":
        return lambda raw: decode_entry(raw, 0, len(raw))
    return lambda raw: decode(NLMSGHDR.unpack_from(raw)[1], raw, 0, len(raw))


def _theirs(cls: Any) -> Callable[[bytes], object]:
    def run(raw: bytes) -> object:
        msg = cls(raw)
        msg.decode()
        return msg

    return run


def _per_message_us(
    fn: Callable[[bytes], object], msgs: list[bytes], loops: int, runs: int
) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(loops):
            for raw in msgs:
                fn(raw)
        best = min(best, time.perf_counter() - t0)
    return best / (loops * len(msgs)) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    recorded = json.loads(DATA.read_text())
    print("netlink decoding, µs per message (best of runs; baseline: pyroute2, same run)")
    head = f"{'message':<28} {'n':>3} {'ours µs':>9} {'pyroute2 µs':>12} {'ratio':>7}"
    print(head)
    print("-" * len(head))
    for what, (cls, label) in KINDS.items():
        msgs = [bytes.fromhex(m["hex"]) for m in recorded if m["what"] == what]
        if not msgs:
            print(f"{label:<28} no recorded messages", file=sys.stderr)
            return 1
        ours = _per_message_us(_ours(what), msgs, args.loops, args.runs)
        theirs = _per_message_us(_theirs(cls), msgs, args.loops, args.runs)
        print(f"{label:<28} {len(msgs):>3} {ours:>9.2f} {theirs:>12.2f} {theirs / ours:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

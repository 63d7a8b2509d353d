"""A minimal socket-activated server for the ``reuseport exec`` tests.

It takes its listeners the systemd way (LISTEN_FDS from fd 3, LISTEN_PID must
be its own pid), says READY=1 on NOTIFY_SOCKET and then, by ``--mode``:

- ``serve``: accepts, reads a line, answers ``new:<line>``
  (tests/netns/test_reuseport_support.serve, which ``collect`` expects);
- ``hold``: never accepts, so connections stay in the accept queue (a hung or
  busy server); with ``--ignore-term`` it also ignores SIGTERM.

``--report FILE`` writes what it was handed (pid, LISTEN_* and the sockets'
addresses) as JSON before saying READY=1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.netns import test_reuseport_support as sup  # after the sys.path tweak


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("serve", "hold"), required=True)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--report")
    args = p.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        print("LISTEN_PID is not my pid", file=sys.stderr)
        return 3
    count = int(os.environ["LISTEN_FDS"])
    socks = [socket.socket(fileno=3 + i) for i in range(count)]
    if args.report:
        report = {
            "pid": os.getpid(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("LISTEN_", "OFFLOADCTL"))},
            "sockets": [
                [
                    s.family,
                    s.getsockname()[1],
                    s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                ]
                for s in socks
            ],
            "fd_after_listeners_open": _is_open(3 + count),
        }
        with open(args.report, "w") as f:
            json.dump(report, f)
    addr = os.environ["NOTIFY_SOCKET"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.sendto(b"READY=1\nSTATUS=serving", "\0" + addr[1:] if addr.startswith("@") else addr)
    if args.mode == "hold":
        while True:
            time.sleep(3600)
    (listener,) = socks  # serve mode: one listener, answered like the migration tests do
    while True:
        sup.serve(listener, n=1000, timeout=3600)
    return 0


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())

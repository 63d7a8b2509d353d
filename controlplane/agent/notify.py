"""sd_notify(3), written by hand: one datagram to $NOTIFY_SOCKET.

The protocol is a few ``KEY=value`` lines over a Unix datagram socket; the
python-systemd binding would pull in libsystemd and a C build for these ten
lines, and the agent must also run where there is no systemd (containers).
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send ``lines`` to systemd; False (and nothing happens) when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload; older ignore it.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")

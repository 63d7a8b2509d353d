#!/usr/bin/env python3
"""A TCP service that restarts itself without resetting a single connection.

Each process is one *generation* with ``--workers`` SO_REUSEPORT listeners.
On SIGHUP it starts its successor and hands over:

1. the successor (generation N+1) opens its listeners, registers them in the
   reuseport group and activates N+1: from now on the BPF program sends new
   connections to N+1 only; then it tells its predecessor it is ready;
2. generation N stops accepting, retires N and closes its listeners without
   accepting what is queued on them: the kernel calls the program for each
   queued connection (and half-open request) and it moves them to N+1;
3. generation N finishes the connections it had already accepted and exits.

Protocol: the client sends one line; the service answers
``<generation> <line>`` and closes.

Try it (after 'offloadctl reuseport load --name demo')::

    python examples/reuseport_service.py --port 8080 --group demo --pidfile /run/demo.pid &
    kill -HUP $(cat /run/demo.pid)      # restart: generation 2 takes over

Without ``--group`` it runs the same dance with no program (the kernel then
resets whatever is queued on the closing listeners, unless the sysctl
net.ipv4.tcp_migrate_req is 1).

``--linger-ms`` simulates an old generation that needs a while between
stopping accept() and closing its listeners (finishing work, flushing logs):
connections arriving in that window queue on the old listeners unless the
program already steers them to the new generation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.errors import ControlPlaneError
from controlplane.kernel.netns import entered
from controlplane.reuseport import DEFAULT_BPFFS, ReuseportGroup

READY = b"ready\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="0.0.0.0", help="address to bind (:: for IPv6)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="listeners per generation")
    p.add_argument("--generation", type=int, default=1)
    p.add_argument("--group", help="reuseport group (omit: no program)")
    p.add_argument("--bpffs", default=DEFAULT_BPFFS)
    p.add_argument("--netns", help="network namespace to serve in (setns, mounts unchanged)")
    p.add_argument("--pidfile", help="written by each generation once it serves")
    p.add_argument("--linger-ms", type=int, default=0)
    p.add_argument(
        "--busy-restart",
        action="store_true",
        help="stop accepting while the successor starts (a busy or naive server): "
        "connections queue on the closing listeners and must migrate",
    )
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


class Service:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.gen: int = args.generation
        self.sel = selectors.DefaultSelector()
        self.listeners: list[socket.socket] = []
        self.conns: dict[socket.socket, bytes] = {}
        self.group: ReuseportGroup | None = None
        self.restart_requested = False
        self.stop_requested = False
        self.served = 0

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[gen {self.gen} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)

    # --- start-up -----------------------------------------------------------

    def open_listeners(self) -> None:
        family = socket.AF_INET6 if ":" in self.args.host else socket.AF_INET
        for _ in range(self.args.workers):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.args.host, self.args.port))
            s.listen(self.args.backlog)
            s.setblocking(False)
            self.listeners.append(s)
        if self.args.group:
            self.group = ReuseportGroup.open(
                self.args.group, netns=self.args.netns, bpffs=self.args.bpffs
            )
            for s in self.listeners:
                self.group.register(s, self.gen)
            # From here on new connections come to us, not to our predecessor.
            self.group.activate(self.gen)
        for s in self.listeners:
            self.sel.register(s, selectors.EVENT_READ, "listener")

    def announce(self) -> None:
        if self.args.pidfile:
            tmp = f"{self.args.pidfile}.{os.getpid()}"
            Path(tmp).write_text(f"{os.getpid()}\n")
            os.replace(tmp, self.args.pidfile)
        if self.args.notify_fd is not None:
            os.write(self.args.notify_fd, READY)
            os.close(self.args.notify_fd)
        self.log(f"serving on port {self.args.port} with {len(self.listeners)} listeners")

    # --- serving ------------------------------------------------------------

    def serve(self) -> None:
        while not self.stop_requested:
            if self.restart_requested:
                self.restart_requested = False
                if self.spawn_successor():
                    break
            for key, _ in self.sel.select(timeout=0.2):
                self.dispatch(key)
        self.hand_over()

    def dispatch(self, key: selectors.SelectorKey) -> None:
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        if key.data == "listener":
            self.accept(sock)
        else:
            self.read(sock)

    def accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.conns[conn] = b""
            self.sel.register(conn, selectors.EVENT_READ, "conn")

    def read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf = self.conns[conn] + data
        if data and b"\n" not in buf and len(buf) < 4096:
            self.conns[conn] = buf
            return
        line = buf.split(b"\n", 1)[0]
        with contextlib.suppress(OSError):
            conn.sendall(f"{self.gen} ".encode() + line + b"\n")
        self.sel.unregister(conn)
        del self.conns[conn]
        conn.close()
        self.served += 1

    # --- restart ------------------------------------------------------------

    def spawn_successor(self) -> bool:
        """Start generation N+1 and keep serving until it is ready; False if it failed."""
        r, w = os.pipe()
        argv = _drop_option(_drop_option(sys.argv[1:], "--generation"), "--notify-fd")
        cmd = [sys.executable, os.path.abspath(__file__), *argv]
        cmd += ["--generation", str(self.gen + 1), "--notify-fd", str(w)]
        child = subprocess.Popen(cmd, pass_fds=[w])
        os.close(w)
        self.sel.register(r, selectors.EVENT_READ, "notify")
        if self.args.busy_restart:
            for s in self.listeners:
                self.sel.unregister(s)
        deadline = time.monotonic() + 10
        ready = b""
        try:
            while READY not in ready and time.monotonic() < deadline:
                if child.poll() is not None:
                    break
                for key, _ in self.sel.select(timeout=0.2):
                    if key.data == "notify":
                        chunk = os.read(r, 64)
                        ready += chunk or b"EOF"
                    else:
                        self.dispatch(key)
                if ready.endswith(b"EOF"):
                    break
        finally:
            self.sel.unregister(r)
            os.close(r)
        if READY not in ready:
            self.log("successor failed to start; still serving")
            if self.args.busy_restart:
                for s in self.listeners:
                    self.sel.register(s, selectors.EVENT_READ, "listener")
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            return False
        self.log(f"generation {self.gen + 1} (pid {child.pid}) is serving; handing over")
        return True

    def hand_over(self) -> None:
        for s in self.listeners:
            with contextlib.suppress(KeyError):  # --busy-restart unregistered them already
                self.sel.unregister(s)
        if self.args.linger_ms:
            # Not accepting any more, listeners still open: what arrives now
            # queues here unless the program already sends it to N+1.
            self.serve_conns_for(self.args.linger_ms / 1000)
        if self.group is not None:
            try:
                self.group.retire(self.gen)
            except ControlPlaneError as exc:
                # Closing is what matters; a closed listener leaves the group anyway.
                self.log(f"cannot retire: {exc}")
        # Close without accepting: queued connections migrate to generation N+1.
        for s in self.listeners:
            s.close()
        self.listeners.clear()
        self.serve_conns_for(5.0, until_idle=True)
        self.log(f"exiting after {self.served} connections")
        if self.group is not None:
            self.group.close()

    def serve_conns_for(self, seconds: float, until_idle: bool = False) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until_idle and not self.conns:
                return
            for key, _ in self.sel.select(timeout=max(0.0, min(0.05, deadline - time.monotonic()))):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                self.read(sock)


def _drop_option(argv: list[str], name: str) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    svc = Service(args)

    def on_hup(_sig: int, _frame: object) -> None:
        svc.restart_requested = True

    def on_term(_sig: int, _frame: object) -> None:
        svc.stop_requested = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with entered(args.netns):
        svc.open_listeners()
        svc.announce()
        svc.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

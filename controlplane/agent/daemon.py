"""``offloadctl agent``: one thread owns every socket, timer and signal.

Why ``selectors`` and not asyncio: everything the agent waits on is a file
descriptor (the control socket and its clients, the netlink sockets of the
watcher, a signal wake-up fd) and every action is short and synchronous
(libnftables, ctnetlink and pyroute2's socket objects are blocking APIs bound
to the calling thread and its namespace). A selector loop runs them in order
on one thread with no executor hops, no coroutine colouring of the kernel
adapters and a wait whose timeout is simply the next deadline.

Why polling for config changes instead of inotify: a stat() per second is
free, needs no ctypes, and follows what editors and Kubernetes really do
(write a temp file and rename it; swap a ConfigMap's ``..data`` symlink),
which an inotify watch on the file itself misses. A change is acted on only
when the bytes' hash differs from the running config's.

Two helper threads exist and neither decides anything: prometheus-client's
HTTP server (reads the published snapshot) and the periodic kernel view
(``status.collect`` with its own short-lived handles: a conntrack dump of a big
table takes long enough that it must not sit between an event and its
teardown); its result is published by the loop.

The agent's jobs (:class:`Agent` wires them: reload and state, topology
re-plans, the kernel view, control requests) are separated from the loop
(:class:`Loop`) so the unit tests drive them with fake ports and no sockets.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.agent import health, notify, protocol
from controlplane.agent import state as state_mod
from controlplane.agent.dispatch import ControlDispatch
from controlplane.agent.logs import DecisionLog
from controlplane.agent.ports import Applier, Observer, Subsystem
from controlplane.agent.published import Published
from controlplane.agent.running import RunningConfig, Where
from controlplane.agent.snapshot import KernelView, Outcome, Snapshot
from controlplane.agent.topology import (
    TOPOLOGY_ATTEMPTS,
    TOPOLOGY_MIN_GAP,
    TopologyReplan,
    hint_links,
)
from controlplane.agent.views import KernelViews
from controlplane.config import Config
from controlplane.kernel.memory import release_free_heap

__all__ = [
    "DRIFT_CHECK",
    "TOPOLOGY_ATTEMPTS",
    "TOPOLOGY_MIN_GAP",
    "Agent",
    "AgentOptions",
    "Loop",
    "run",
]

KERNEL_REFRESH = 10.0  # seconds between kernel views for status/metrics
# Seconds between drift checks: a change another writer made to our table
# (``apply --force``, a hand edit) is undone within this bound. A check with
# nothing changed costs one ruleset-generation read (the verified-stamp path).
DRIFT_CHECK = 10.0


@dataclass(frozen=True)
class AgentOptions:
    config_path: Path
    netns: str | None = None
    state_path: Path | None = None
    socket_path: Path | None = None
    cleanup_on_exit: bool = False
    watch_interval: float = 1.0  # seconds between config-file checks; 0 disables
    metrics: tuple[str, int] | None = None
    drift_interval: float = DRIFT_CHECK  # seconds between drift checks; 0 disables
    health_stale_after: float = health.STALE_AFTER  # /healthz fails past this loop stall


def _file_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Agent:
    """The agent's jobs, wired together; the loop calls these and nothing else.

    Each job is its own module: the running config and state
    (:mod:`.running`), topology re-plans (:mod:`.topology`), the kernel view
    (:mod:`.views`), control requests (:mod:`.dispatch`), the published status
    (:mod:`.published`)."""

    def __init__(
        self,
        opts: AgentOptions,
        applier: Applier,
        observer: Observer,
        log: DecisionLog,
        *,
        version: str = "0",
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.opts = opts
        self.subsystems: tuple[Subsystem, ...] = ()
        self.state_path = opts.state_path or state_mod.default_state_path(opts.netns)
        self.published = Published(
            version=version,
            netns=opts.netns,
            config_path=str(opts.config_path),
            started_at=clock(),
            drift_check_seconds=opts.drift_interval,
            subsystem_stats=self._subsystem_stats,
        )
        where = Where(opts.config_path, self.state_path, opts.netns, opts.cleanup_on_exit)
        subs = self._subs
        self.running_config = RunningConfig(where, applier, log, self.published, subs, clock)
        self.topology = TopologyReplan(
            self.running_config, applier, subs, log, clock=clock, monotonic=monotonic
        )
        self.views = KernelViews(observer, opts.netns, self.published, self._running, clock)
        self.control = ControlDispatch(
            reload=self.reload,
            refresh_table=self.views.refresh_table,
            snapshot=self.published.snapshot,
            observer=observer,
            running=self._running,
            netns=opts.netns,
            log=log,
        )
        self._applier = applier

    def _subs(self) -> tuple[Subsystem, ...]:
        return self.subsystems

    def _running(self) -> Config | None:
        return self.running_config.config

    def _subsystem_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        for sub in self.subsystems:
            stats.update(sub.stats())
        return stats

    @property
    def running(self) -> Config | None:
        return self._running()

    @property
    def running_sha(self) -> str:
        return self.running_config.sha

    def start(self) -> None:
        """Refuse unusable state, parse the config, apply it. Raises on failure."""
        self.running_config.start()
        self.views.refresh()

    def stop(self) -> None:
        self.running_config.stop()

    def reload(self, source: str) -> Outcome:
        return self.running_config.reload(source)

    def config_file_changed(self) -> Outcome | None:
        return self.running_config.file_changed()

    def check_drift(self) -> None:
        """Periodic: restore what another writer changed, planned from the
        watcher's link cache (no netlink facts dump per check)."""
        if self.running_config.config is not None:
            hint_links(self._applier, self.subsystems)
        self.running_config.check_drift()

    def topology_changed(self) -> None:
        self.topology.changed()

    def reapply_deadline(self) -> float | None:
        return self.topology.deadline()

    def reapply_if_needed(self) -> None:
        self.topology.replan_if_needed()

    def observe_kernel(self) -> KernelView | None:
        return self.views.observe()

    def refresh_kernel(self) -> None:
        self.views.refresh()

    def publish_kernel_view(self, view: KernelView) -> None:
        self.views.publish(view)

    def snapshot(self) -> Snapshot:
        """The latest published snapshot (safe to call from any thread)."""
        return self.published.snapshot()

    def handle(self, req: protocol.Request) -> bytes:
        return self.control.handle(req)


@dataclass
class _Periodic:
    every: float
    fn: Callable[[], None]
    next_at: float = field(default=0.0)


class Loop:
    """Selector + timers + signals on the calling (main) thread."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._timers: list[_Periodic] = []
        self._deadlines: list[Callable[[], float | None]] = []
        self._before_wait: list[Callable[[], None]] = []
        self._signals: dict[int, Callable[[], object]] = {}
        self._stop = False
        # Signals are delivered as bytes on a socketpair (set_wakeup_fd), so a
        # signal handled mid-apply is processed afterwards, in order, by the loop.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_signal)
        # Set now, not in run(): a SIGTERM during the initial apply is kept and handled.
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def every(self, seconds: float, fn: Callable[[], None]) -> None:
        self._timers.append(_Periodic(seconds, fn, time.monotonic() + seconds))

    def add_deadline_source(self, fn: Callable[[], float | None]) -> None:
        self._deadlines.append(fn)

    def before_wait(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on every iteration, after dispatch and before waiting again."""
        self._before_wait.append(fn)

    def on_signal(self, signum: int, fn: Callable[[], object]) -> None:
        self._signals[signum] = fn
        signal.signal(signum, lambda *_: None)  # the wake-up fd carries it

    def stop(self) -> None:
        self._stop = True

    def _on_signal(self, _mask: int) -> None:
        try:
            data = self._wake_r.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            fn = self._signals.get(signum)
            if fn is not None:
                fn()

    def run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            for t in self._timers:
                if t.next_at <= now:
                    t.next_at = now + t.every
                    t.fn()
            for fn in self._before_wait:
                fn()
            deadlines = [t.next_at for t in self._timers]
            deadlines += [d for src in self._deadlines if (d := src()) is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, mask in self.sel.select(timeout):
                key.data(mask)
                if self._stop:
                    break

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


def run(
    opts: AgentOptions,
    applier: Applier,
    observer: Observer,
    log: DecisionLog,
    *,
    version: str = "0",
    make_subsystems: Callable[[Agent], tuple[Subsystem, ...]] = lambda _agent: (),
) -> None:
    """Run the agent until SIGTERM/SIGINT. Raises ControlPlaneError if it cannot start."""
    from controlplane.agent import control

    loop = Loop()
    agent = Agent(opts, applier, observer, log, version=version)
    agent.subsystems = make_subsystems(agent)
    socket_path = opts.socket_path or control.default_socket_path(opts.netns)
    server: control.ControlServer | None = None
    stop_metrics: Callable[[], None] | None = None
    stop_refresher: Callable[[], None] | None = None
    try:
        # The socket first: a second agent for the same namespace stops here,
        # before it touches the kernel.
        server = control.ControlServer(socket_path, loop.sel, agent.handle)
        srv = server
        agent.published.control_stats = lambda: {
            "requests": srv.stats.requests,
            "errors": srv.stats.errors,
            "refused": srv.stats.refused,
            "timeouts": srv.stats.timeouts,
        }
        # Handlers before the first apply: a signal meanwhile waits for the loop.
        loop.on_signal(signal.SIGHUP, lambda: agent.reload("sighup"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.on_signal(sig, loop.stop)
        agent.start()
        release_free_heap()  # the start-up dump's buffers and temporaries
        loop.add_deadline_source(server.next_deadline)
        loop.every(0.5, server.expire)
        # The periodic kernel view (a conntrack dump: ~0.5 s per 50k entries) is
        # taken on a helper thread so it never delays events; the loop publishes it.
        views: list[KernelView] = []
        refresher_stop = threading.Event()

        def refresher() -> None:
            while not refresher_stop.wait(KERNEL_REFRESH):
                view = agent.observe_kernel()
                release_free_heap()  # the dump's, on this thread's own malloc arena
                if view is not None:
                    views.append(view)  # list.append/pop are atomic under the GIL

        def publish_views() -> None:
            while views:
                agent.publish_kernel_view(views.pop(0))

        loop.before_wait(publish_views)
        threading.Thread(target=refresher, name="kernel-view", daemon=True).start()
        stop_refresher = refresher_stop.set
        if opts.watch_interval > 0:
            last = [_file_key(opts.config_path)]

            def poll_config() -> None:
                key = _file_key(opts.config_path)
                if key != last[0]:
                    last[0] = key
                    agent.config_file_changed()

            loop.every(opts.watch_interval, poll_config)
        if opts.drift_interval > 0:
            loop.every(opts.drift_interval, agent.check_drift)
        registered: dict[int, tuple[int, list[int]]] = {}  # id(sub) -> (epoch, fds)

        def sync_fds() -> None:
            # A reload may re-create a subsystem's sockets (and the kernel may reuse
            # the fd numbers): re-register whenever its epoch moved.
            for sub in agent.subsystems:
                epoch, old = registered.get(id(sub), (-1, []))
                if epoch == sub.epoch:
                    continue
                for fd in old:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        loop.sel.unregister(fd)
                fds = sub.fds()
                for fd in fds:
                    loop.sel.register(fd, selectors.EVENT_READ, lambda _m, s=sub: s.on_readable())
                registered[id(sub)] = (sub.epoch, fds)

        loop.before_wait(sync_fds)
        loop.before_wait(agent.reapply_if_needed)
        loop.add_deadline_source(agent.reapply_deadline)
        for sub in agent.subsystems:
            loop.every(1.0, sub.tick)
        probes = health.Health.from_environment(
            agent.snapshot,
            lambda: agent.running is not None and agent.running.invalidation.enabled,
            opts.health_stale_after,
        )
        loop.before_wait(probes.beat)
        if opts.metrics is not None:
            from controlplane.agent import metrics

            stop_metrics = metrics.serve(opts.metrics, agent.snapshot, probes.wsgi)
            log.info("metrics", f"serving on {opts.metrics[0]}:{opts.metrics[1]}")
        log.info(
            "start",
            "running",
            netns=opts.netns or "host",
            socket=str(socket_path),
            state=str(agent.state_path),
            config=str(opts.config_path),
        )
        notify.ready("running")
        loop.run()
        notify.stopping()
        agent.stop()
    finally:
        if stop_refresher is not None:
            stop_refresher()
        if stop_metrics is not None:
            stop_metrics()
        if server is not None:
            server.close()
        loop.close()

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

Decisions (:class:`Agent`) are separated from the loop (:class:`Loop`) so the
unit tests drive the agent with fake ports and no sockets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controlplane.agent import health, notify, protocol
from controlplane.agent import state as state_mod
from controlplane.agent.logs import DecisionLog
from controlplane.agent.ports import Applier, Observer, Subsystem
from controlplane.agent.snapshot import KernelView, Outcome, Snapshot
from controlplane.config import Config
from controlplane.errors import ConfigError, ControlPlaneError
from controlplane.loader import MAX_BYTES, load_config
from controlplane.regular_file import read_regular

KERNEL_REFRESH = 10.0  # seconds between kernel views for status/metrics
TOPOLOGY_MIN_GAP = 0.01  # link-event bursts coalesce into one re-plan per 10 ms
TOPOLOGY_ATTEMPTS = 3
FLOWS_LIMIT = 100_000
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


def _sha256(path: Path) -> str:
    # Never block: the config may have been replaced by a FIFO (load_config then
    # says so; here it is just no digest).
    try:
        return hashlib.sha256(read_regular(path, MAX_BYTES)).hexdigest()
    except OSError:
        return ""


def _issues(exc: ConfigError) -> tuple[dict[str, Any], ...]:
    return tuple({"path": i.path, "message": i.message, "line": i.line} for i in exc.issues)


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


# The log event of a commit, by what caused it (anything else: a reload).
_EVENTS = {"start": "apply", "topology": "topology", "drift": "drift"}


class Agent:
    """The agent's decisions; the loop calls these and nothing else."""

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
        self._applier = applier
        self._observer = observer
        self._log = log
        self._clock = clock
        self._monotonic = monotonic
        self.subsystems: tuple[Subsystem, ...] = ()
        self.state_path = opts.state_path or state_mod.default_state_path(opts.netns)
        self.running: Config | None = None
        self.running_sha = ""
        self.owned: state_mod.AppliedState | None = None
        self._rejected_sha = ""  # a bad file we already reported (don't repeat every poll)
        self._topology_dirty = False
        self._last_topology_apply = 0.0
        # When the first link event of a pending re-plan was read (wall clock) and
        # handled: logged with the commit, so a join's latency can be broken down.
        self._event_woke_at = 0.0
        self._event_handled_at = 0.0
        self.control_stats: Callable[[], dict[str, int]] = dict
        self._drift_error = ""  # the last drift check's failure (logged once, not per period)
        self._drift_repairs = 0
        self._snap = Snapshot(
            version=version,
            pid=os.getpid(),
            netns=opts.netns,
            config_path=str(opts.config_path),
            config_sha256="",
            started_at=clock(),
            table="",
            drift_check_seconds=opts.drift_interval,
        )

    # -- start / stop -------------------------------------------------------

    def start(self) -> None:
        """Refuse unusable state, parse the config, apply it. Raises on failure."""
        self.owned = state_mod.load(self.state_path)  # a future schema stops us here
        if self.owned is not None:
            self._log.info(
                "state",
                f"recovered state of {time.ctime(self.owned.applied_at)}",
                path=str(self.state_path),
                groups=len(self.owned.reuseport_groups),
            )
        sha = _sha256(self.opts.config_path)
        cfg = load_config(self.opts.config_path)
        # The first apply reconciles: planned against what the kernel has, so a
        # restart after kill -9 sends nothing when nothing changed meanwhile.
        self._commit(cfg, sha, "start")
        for sub in self.subsystems:
            sub.reconfigure(cfg)
        self.refresh_kernel()

    def stop(self) -> None:
        for sub in self.subsystems:
            with contextlib.suppress(Exception):
                sub.close()
        if not self.opts.cleanup_on_exit or self.running is None:
            self._log.info("stop", "stopping; kernel state left in place (fast paths keep serving)")
            return
        try:
            done = self._applier.cleanup(self.running, self.opts.netns, self.owned)
        except ControlPlaneError as exc:
            self._log.error("stop", f"cleanup failed: {_one_line(exc)}")
            return
        state_mod.remove(self.state_path)
        self._log.info("stop", "cleaned up what we own", actions=done)

    # -- apply / reload -----------------------------------------------------

    def _commit(
        self,
        cfg: Config,
        sha: str,
        source: str,
        *,
        quiet_if_unchanged: bool = False,
        timing: dict[str, float] | None = None,
    ) -> Outcome:
        start = time.monotonic()
        try:
            res = self._applier.apply(cfg, self.opts.netns, self.owned)
        except ControlPlaneError as exc:
            out = Outcome(
                self._clock(),
                False,
                source,
                seconds=time.monotonic() - start,
                error=_one_line(exc),
                issues=_issues(exc) if isinstance(exc, ConfigError) else (),
                exit_code=exc.exit_code,
            )
            self._record(apply=out)
            event = _EVENTS.get(source, "reload")
            kept = "" if self.running is None else ", running config kept"
            if source != "drift" or out.error != self._drift_error:  # not once per period
                self._log.error(event, f"refused{kept}: {out.error}", source=source)
            if source == "drift":
                self._drift_error = out.error or ""
            raise
        out = Outcome(
            self._clock(), True, source, res.changed, res.summary, time.monotonic() - start
        )
        if quiet_if_unchanged and not res.changed:
            # A link event that changed none of our devices: nothing to record,
            # no state write (an fsync per FDB/link burst would be the cost).
            return out
        self.running, self.running_sha = cfg, sha
        before = self.owned
        self.owned = state_mod.AppliedState(
            netns=self.opts.netns,
            config_path=str(self.opts.config_path),
            config_sha256=sha,
            table_family=cfg.table.family,
            table_name=cfg.table.name,
            applied_at=out.at,
            reuseport_groups=tuple(sorted(res.reuseport)),
            reuseport_bpffs=cfg.reuseport.bpffs,
        )
        if before is None or replace(before, applied_at=out.at) != self.owned:
            # A topology re-plan changes devices, not what we own: no fsync per join.
            state_mod.save(self.state_path, self.owned)
        drift = source == "drift"
        if drift:
            self._drift_error = ""
            self._drift_repairs += 1
        self._record(apply=out, reuseport=res.reuseport)
        verdict = f"{len(res.summary)} change(s)" if res.changed else "no changes"
        event = _EVENTS.get(source, "reload")
        extra: dict[str, Any] = dict(timing or {})
        if timing is not None:
            extra["phases_ms"] = res.phases
        (self._log.warning if drift else self._log.info)(
            event,
            "restored the table another writer changed" if drift else f"committed: {verdict}",
            source=source,
            ms=round(out.seconds * 1000, 1),
            changes=len(res.summary),
            flows_torn_down=res.flows_torn_down,
            **extra,
        )
        for line in res.summary:
            self._log.info(event, line.strip(), source=source)
        settle = getattr(self._applier, "settle", None)
        if settle is not None:
            settle()  # after the log lines: what lets the next join skip the listing
        return out

    def reload(self, source: str) -> Outcome:
        """Parse the file again and commit it; on any error keep the running config."""
        notify.reloading()
        sha = _sha256(self.opts.config_path)
        try:
            # The same bytes parse to the same config: skip the parser (~80 ms at
            # 1,000 rules) but still plan against the kernel, which restores drift.
            same = self.running is not None and sha == self.running_sha
            cfg = self.running if same and self.running else load_config(self.opts.config_path)
        except ConfigError as exc:
            out = Outcome(
                self._clock(),
                False,
                source,
                error=f"invalid config ({len(exc.issues)} problem(s))",
                issues=_issues(exc),
                exit_code=exc.exit_code,
            )
            self._rejected_sha = sha
            self._record(reload=out)
            self._log.error(
                "reload",
                "invalid config; running config kept",
                source=source,
                problems=[str(i) for i in exc.issues],
            )
            notify.ready("running (last reload refused: invalid config)")
            return out
        try:
            applied = self._commit(cfg, sha, source)
        except ControlPlaneError as exc:
            out = Outcome(
                self._clock(),
                False,
                source,
                error=_one_line(exc),
                issues=_issues(exc) if isinstance(exc, ConfigError) else (),
                exit_code=exc.exit_code,
            )
            self._rejected_sha = sha
            self._record(reload=out)
            notify.ready("running (last reload refused by the kernel)")
            return out
        for sub in self.subsystems:
            sub.reconfigure(cfg)
        self._record(reload=applied)
        notify.ready("running")
        return applied

    def topology_changed(self) -> None:
        """A link appeared, vanished or changed master: bridge ports may differ."""
        if not self._topology_dirty:
            self._event_handled_at = self._clock()
            woke = [getattr(sub, "woke_at", 0.0) for sub in self.subsystems]
            self._event_woke_at = max(woke, default=0.0) or self._event_handled_at
        self._topology_dirty = True

    def check_drift(self) -> None:
        """Periodic: plan the running config against the kernel again and commit
        what differs (another writer changed our table). Nothing changed: nothing
        is logged or sent."""
        if self.running is None:
            return
        self._hint_links()  # the watcher's link cache: no netlink facts dump per check
        with contextlib.suppress(ControlPlaneError):  # logged by _commit (once)
            self._commit(self.running, self.running_sha, "drift", quiet_if_unchanged=True)

    def reapply_deadline(self) -> float | None:
        if not self._topology_dirty:
            return None
        return self._last_topology_apply + TOPOLOGY_MIN_GAP

    def reapply_if_needed(self) -> None:
        """Re-plan against the links that exist now; bounded retries.

        A device that vanishes between planning and commit (a container deleted
        mid-apply) makes the preflight or the kernel refuse; the next attempt
        plans against what exists then. The running config never changes here.
        """
        if not self._topology_dirty or self.running is None:
            return
        if self._monotonic() < self._last_topology_apply + TOPOLOGY_MIN_GAP:
            return
        self._topology_dirty = False
        planned_at = self._clock()
        timing = {
            # wall clock: the bench compares it with when it asked for the join
            "event_read_at": round(self._event_woke_at, 4),
            "handle_ms": round((self._event_handled_at - self._event_woke_at) * 1000, 1),
            "wait_ms": round((planned_at - self._event_handled_at) * 1000, 1),
        }
        for attempt in range(1, TOPOLOGY_ATTEMPTS + 1):
            self._last_topology_apply = self._monotonic()
            if attempt == 1:
                self._hint_links()
            else:
                # Read what the watcher has queued since (the vanished device's
                # event); the retry then plans against the kernel itself.
                for sub in self.subsystems:
                    sub.on_readable()
            try:
                self._commit(
                    self.running,
                    self.running_sha,
                    "topology",
                    quiet_if_unchanged=True,
                    timing=timing,
                )
                return
            except ControlPlaneError as exc:
                if attempt == TOPOLOGY_ATTEMPTS:
                    self._log.error(
                        "topology",
                        f"gave up after {attempt} attempts; next link change retries: "
                        f"{_one_line(exc)}",
                    )
                else:
                    self._log.info(
                        "topology",
                        f"attempt {attempt} refused, re-planning against what exists:"
                        f" {_one_line(exc)}",
                    )

    def _hint_links(self) -> None:
        """Let the applier plan from the watcher's link cache (no netlink dump):
        the event that made us re-plan is already in it."""
        if not hasattr(self._applier, "links_hint"):
            return
        for sub in self.subsystems:
            links = getattr(sub, "links", lambda: None)()
            if links is not None:
                self._applier.links_hint = links
                return

    def config_file_changed(self) -> Outcome | None:
        """Called when the file's stat changed: reload if its bytes did."""
        sha = _sha256(self.opts.config_path)
        if not sha or sha in (self.running_sha, self._rejected_sha):
            return None
        return self.reload("file")

    # -- observation --------------------------------------------------------

    def observe_kernel(self) -> KernelView | None:
        """A fresh kernel view (safe off the loop thread: the observer opens its
        own handles, and ``running`` is read once)."""
        running = self.running
        if running is None:
            return None
        try:
            return self._observer.observe(running, self.opts.netns)
        except ControlPlaneError as exc:
            return replace(self._snap.kernel, at=self._clock(), error=_one_line(exc))

    def refresh_kernel(self) -> None:
        view = self.observe_kernel()
        if view is not None:
            self._record(kernel=view)

    def refresh_table(self) -> None:
        """Refresh the table part of the kernel view (present, flowtable devices,
        counters) on the loop thread; conntrack counts stay the periodic view's."""
        running = self.running
        if running is None:
            return
        observe_table = getattr(self._observer, "observe_table", None)
        if observe_table is None:
            self.refresh_kernel()
            return
        try:
            part: KernelView = observe_table(running, self.opts.netns)
        except ControlPlaneError as exc:
            part = replace(self._snap.kernel, table_at=self._clock(), error=_one_line(exc))
        k = self._snap.kernel
        self._record(
            kernel=replace(
                k,
                table_at=part.table_at,
                table_present=part.table_present,
                flowtables=part.flowtables,
                counters=part.counters,
                reuseport=part.reuseport,
                error=part.error or (k.error if k.at > part.table_at else None),
            )
        )

    def publish_kernel_view(self, view: KernelView) -> None:
        k = self._snap.kernel
        if view.at <= k.at:
            return
        if view.table_at < k.table_at:  # a status request saw the table since
            view = replace(
                view,
                table_at=k.table_at,
                table_present=k.table_present,
                flowtables=k.flowtables,
                counters=k.counters,
                reuseport=k.reuseport,
            )
        self._record(kernel=view)

    def _record(
        self,
        *,
        apply: Outcome | None = None,
        reload: Outcome | None = None,
        kernel: KernelView | None = None,
        reuseport: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        s = self._snap
        applies, reloads = dict(s.applies), dict(s.reloads)
        if apply is not None:
            key = "ok" if apply.ok else "failed"
            applies[key] = applies.get(key, 0) + 1
        if reload is not None:
            key = "ok" if reload.ok else "failed"
            reloads[key] = reloads.get(key, 0) + 1
        inv: dict[str, Any] = {}
        for sub in self.subsystems:
            inv.update(sub.stats())
        self._snap = replace(
            s,
            config_sha256=self.running_sha,
            table=f"{self.running.table.family} {self.running.table.name}" if self.running else "",
            last_apply=apply or s.last_apply,
            last_reload=reload or s.last_reload,
            applies=applies,
            reloads=reloads,
            kernel=kernel or s.kernel,
            reuseport=reuseport if reuseport is not None else s.reuseport,
            invalidation=inv or s.invalidation,
            control=self.control_stats(),
            drift_repairs=self._drift_repairs,
            flowtable_names=tuple(ft.name for ft in self.running.flowtables)
            if self.running
            else s.flowtable_names,
        )

    def snapshot(self) -> Snapshot:
        """The latest published snapshot (safe to call from any thread)."""
        return self._snap

    # -- control protocol ---------------------------------------------------

    def _flows(self, args: dict[str, Any]) -> bytes:
        """Kernel truth, read as the CLI reads it without an agent (kernel/flowstate)."""
        from controlplane.core.flowselect import Selector

        limit = args.get("limit", FLOWS_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            return protocol.error("bad_request", "'limit' must be a non-negative integer")
        offloaded = args.get("offloaded", False)
        if not isinstance(offloaded, bool):
            return protocol.error("bad_request", "'offloaded' must be true or false")
        selector = None
        raw = args.get("selector")
        if raw is not None:
            if not isinstance(raw, dict) or raw.get("kind") not in ("mac", "ip", "prefix", "dev"):
                return protocol.error("bad_request", "'selector' must be {kind, value}")
            try:
                selector = Selector.parse(raw["kind"], str(raw.get("value", "")))
            except ValueError as exc:
                return protocol.error("bad_request", str(exc))
        if self.running is None:
            return protocol.error("unavailable", "no config is running yet")
        flows, truncated = self._observer.flows(
            self.running, self.opts.netns, min(limit, FLOWS_LIMIT), selector, offloaded
        )
        return protocol.ok({"flows": flows, "truncated": truncated, "source": "conntrack"})

    def handle(self, req: protocol.Request) -> bytes:
        try:
            if req.op == "status":
                # The table only (a few ms): a conntrack dump of a big table would
                # hold the loop; its counts come from the periodic view instead.
                self.refresh_table()
                return protocol.ok(status_doc(self._snap))
            if req.op == "reload":
                out = self.reload("control")
                if out.ok:
                    return protocol.ok(
                        {
                            "changed": out.changed,
                            "summary": list(out.summary),
                            "seconds": out.seconds,
                        }
                    )
                code: protocol.ErrorCode = "config_invalid" if out.issues else "apply_failed"
                return protocol.error(
                    code,
                    f"{out.error}; running config kept",
                    issues=list(out.issues),
                    exit_code=out.exit_code,
                )
            if req.op == "flows":
                return self._flows(req.args)
        except ControlPlaneError as exc:
            return protocol.error("unavailable", _one_line(exc))
        except Exception as exc:  # a bug: answer and keep serving; the log says what
            self._log.error("control", f"internal error in {req.op}: {type(exc).__name__}: {exc}")
            return protocol.error("internal", f"{type(exc).__name__}: {exc}")
        return protocol.error("unknown_op", f"unknown op {req.op!r}")


def status_doc(snap: Snapshot) -> dict[str, Any]:
    """The ``status`` answer: the snapshot, opened by the verdict line the CLI prints."""
    from controlplane.core.explain import status_line

    doc = snap.to_json()
    line = status_line(doc["kernel"]) if snap.kernel.at else "kernel not read yet"
    return {"verdict": line, **doc}


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
        agent.control_stats = lambda: {
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
        loop.add_deadline_source(server.next_deadline)
        loop.every(0.5, server.expire)
        # The periodic kernel view (a conntrack dump: ~0.5 s per 50k entries) is
        # taken on a helper thread so it never delays events; the loop publishes it.
        views: list[KernelView] = []
        refresher_stop = threading.Event()

        def refresher() -> None:
            while not refresher_stop.wait(KERNEL_REFRESH):
                view = agent.observe_kernel()
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

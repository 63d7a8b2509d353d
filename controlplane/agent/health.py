"""The agent's liveness and readiness, fed by its main loop, served over HTTP.

The metrics exporter runs on its own thread and keeps answering while the
loop is stuck (a kernel call that blocks, a namespace lock held elsewhere), so
a probe of ``/metrics`` proves only that the exporter runs. Instead the loop
stamps a heartbeat on every iteration (it wakes at least twice a second), and
the HTTP thread compares that stamp with the clock:

- ``/healthz``: live while the loop ran within ``stale_after`` seconds; a
  stalled loop answers 503 and a liveness probe restarts the agent.
- ``/readyz``: live, the config is committed and the owned table is there (the
  latest kernel view shows it, or a commit since put it back), and the watcher
  runs when the config enables it.

Both are served by the metrics HTTP server (``offloadctl agent --metrics``).
The verdicts are pure functions of what the loop published; the HTTP thread
never touches the kernel or the loop's objects.

Under systemd with ``WatchdogSec=`` the same heartbeat pings the watchdog
(``WATCHDOG=1``, at half its interval), so a host's stalled loop is restarted
too: the ping comes from the loop, never from a helper thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.agent import notify
from controlplane.agent.snapshot import Snapshot
from controlplane.core.numbers import ascii_decimal

STALE_AFTER = 30.0  # seconds without a loop iteration before /healthz fails
PATHS = ("/healthz", "/readyz")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...] = ()

    def body(self) -> bytes:
        return ("\n".join(self.reasons or ("ok",)) + "\n").encode()


def liveness(now: float, last_beat: float, stale_after: float) -> Verdict:
    age = now - last_beat
    if age > stale_after:
        why = f"main loop stalled: last ran {age:.1f} s ago (limit {stale_after:g} s)"
        return Verdict(False, (why,))
    return Verdict(True)


def readiness(live: Verdict, snap: Snapshot, wants_watcher: bool) -> Verdict:
    reasons = list(live.reasons if not live.ok else ())
    last = snap.last_apply
    # A commit newer than the kernel view put the table back (or kept it).
    committed_since = last is not None and last.ok and last.at >= snap.kernel.table_at
    if not snap.config_sha256:
        reasons.append("no config committed yet")
    elif not snap.kernel.table_present and not committed_since:
        reasons.append(f"table {snap.table} absent in the latest kernel view")
    if wants_watcher and not snap.invalidation.get("enabled"):
        reasons.append("the config enables invalidation but the watcher is not running")
    return Verdict(not reasons, tuple(reasons))


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings systemd asks for (half its timeout), or None."""
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    period = ascii_decimal(usec)
    if not period or (owner and owner != str(pid)):
        return None
    return period / 2e6


class Health:
    """The loop calls :meth:`beat`; the HTTP thread calls :meth:`live` / :meth:`ready`."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        wants_watcher: Callable[[], bool],
        stale_after: float = STALE_AFTER,
        monotonic: Callable[[], float] = time.monotonic,
        watchdog_every: float | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._wants_watcher = wants_watcher
        self.stale_after = stale_after
        self._monotonic = monotonic
        self._last_beat = monotonic()
        self._watchdog_every = watchdog_every
        self._next_ping = self._last_beat

    @classmethod
    def from_environment(
        cls, snapshot: Callable[[], Snapshot], wants_watcher: Callable[[], bool], stale_after: float
    ) -> Health:
        every = watchdog_period(os.environ, os.getpid())
        return cls(snapshot, wants_watcher, stale_after, watchdog_every=every)

    def beat(self) -> None:
        now = self._monotonic()
        self._last_beat = now  # one float store: atomic under the GIL
        if self._watchdog_every is not None and now >= self._next_ping:
            self._next_ping = now + self._watchdog_every
            notify.notify("WATCHDOG=1")

    def live(self) -> Verdict:
        return liveness(self._monotonic(), self._last_beat, self.stale_after)

    def ready(self) -> Verdict:
        return readiness(self.live(), self._snapshot(), self._wants_watcher())

    def wsgi(self, app: WSGIApp) -> WSGIApp:
        """``app`` (the metrics exporter) with /healthz and /readyz in front of it."""
        verdicts = {"/healthz": self.live, "/readyz": self.ready}

        def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            check = verdicts.get(environ.get("PATH_INFO", ""))
            if check is None:
                return app(environ, start_response)
            verdict = check()
            status = "200 OK" if verdict.ok else "503 Service Unavailable"
            body = verdict.body()
            start_response(
                status,
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
            )
            return [body]

        return routed

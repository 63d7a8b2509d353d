"""The running config and what we own: start, reload, commit, drift, stop.

A commit is recorded (the state file, the published status, the log) only
after the applier said yes; any refusal keeps the running config. The state
file is rewritten only when what we own changed: a topology re-plan changes
devices, not ownership, and must not cost an fsync per port join.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controlplane.agent import notify
from controlplane.agent import state as state_mod
from controlplane.agent.logs import DecisionLog
from controlplane.agent.ports import Applier, Subsystem
from controlplane.agent.published import Published
from controlplane.agent.snapshot import Outcome
from controlplane.config import Config
from controlplane.errors import ConfigError, ControlPlaneError, one_line
from controlplane.loader import MAX_BYTES, load_config
from controlplane.regular_file import read_regular

# The log event of a commit, by what caused it (anything else: a reload).
_EVENTS = {"start": "apply", "topology": "topology", "drift": "drift"}


def file_sha256(path: Path) -> str:
    # Never block: the config may have been replaced by a FIFO (load_config then
    # says so; here it is just no digest).
    try:
        return hashlib.sha256(read_regular(path, MAX_BYTES)).hexdigest()
    except OSError:
        return ""


def refused(at: float, source: str, exc: ControlPlaneError, error: str | None = None) -> Outcome:
    """The outcome of a refused reload or commit: one line, and a config's issues."""
    return Outcome(
        at,
        False,
        source,
        error=error if error is not None else one_line(exc),
        issues=tuple({"path": i.path, "message": i.message, "line": i.line} for i in exc.issues)
        if isinstance(exc, ConfigError)
        else (),
        exit_code=exc.exit_code,
    )


@dataclass(frozen=True)
class Where:
    """The files of one agent: its config, its state."""

    config_path: Path
    state_path: Path
    netns: str | None
    cleanup_on_exit: bool = False


class RunningConfig:
    def __init__(
        self,
        where: Where,
        applier: Applier,
        log: DecisionLog,
        published: Published,
        subsystems: Callable[[], Sequence[Subsystem]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.where = where
        self._applier = applier
        self._log = log
        self._published = published
        self._subsystems = subsystems
        self._clock = clock
        self.config: Config | None = None
        self.sha = ""
        self.owned: state_mod.AppliedState | None = None
        self._rejected_sha = ""  # a bad file we already reported (don't repeat every poll)
        self._drift_error = ""  # the last drift check's failure (logged once, not per period)

    def start(self) -> None:
        """Refuse unusable state, parse the config, apply it. Raises on failure."""
        self.owned = state_mod.load(self.where.state_path)  # a future schema stops us here
        if self.owned is not None:
            self._log.info(
                "state",
                f"recovered state of {time.ctime(self.owned.applied_at)}",
                path=str(self.where.state_path),
                groups=len(self.owned.reuseport_groups),
            )
        sha = file_sha256(self.where.config_path)
        cfg = load_config(self.where.config_path)
        # The first apply reconciles: planned against what the kernel has, so a
        # restart after kill -9 sends nothing when nothing changed meanwhile.
        self.commit(cfg, sha, "start")
        for sub in self._subsystems():
            sub.reconfigure(cfg)

    def stop(self) -> None:
        for sub in self._subsystems():
            try:
                sub.close()
            except (ControlPlaneError, OSError) as exc:  # a bug is no reason to hide: it rises
                self._log.error("stop", f"closing {sub.name}: {one_line(exc)}")
        if not self.where.cleanup_on_exit or self.config is None:
            self._log.info("stop", "stopping; kernel state left in place (fast paths keep serving)")
            return
        try:
            done = self._applier.cleanup(self.config, self.where.netns, self.owned)
        except ControlPlaneError as exc:
            self._log.error("stop", f"cleanup failed, state kept: {one_line(exc)}")
            return
        state_mod.remove(self.where.state_path)
        self._log.info("stop", "cleaned up what we own", actions=done)

    def commit(
        self,
        cfg: Config,
        sha: str,
        source: str,
        *,
        quiet_if_unchanged: bool = False,
        timing: dict[str, float] | None = None,
    ) -> Outcome:
        start = time.monotonic()
        event = _EVENTS.get(source, "reload")
        drift = source == "drift"
        try:
            res = self._applier.apply(cfg, self.where.netns, self.owned)
        except ControlPlaneError as exc:
            out = replace(refused(self._clock(), source, exc), seconds=time.monotonic() - start)
            self._published.record(apply=out)
            kept = "" if self.config is None else ", running config kept"
            if not drift or out.error != self._drift_error:  # not once per period
                self._log.error(event, f"refused{kept}: {out.error}", source=source)
            if drift:
                self._drift_error = out.error or ""
            raise
        out = Outcome(
            self._clock(), True, source, res.changed, res.summary, time.monotonic() - start
        )
        if quiet_if_unchanged and not res.changed:
            # A link event that changed none of our devices: nothing to record,
            # no state write (an fsync per FDB/link burst would be the cost).
            return out
        self.config, self.sha = cfg, sha
        self._published.running(cfg, sha)
        before = self.owned
        self.owned = state_mod.AppliedState(
            netns=self.where.netns,
            config_path=str(self.where.config_path),
            config_sha256=sha,
            table_family=cfg.table.family,
            table_name=cfg.table.name,
            applied_at=out.at,
            reuseport_groups=tuple(sorted(set(res.reuseport) | set(res.kept_groups))),
            # A group kept because its removal failed is looked for where it was
            # pinned (the state has one bpffs: a changed bpffs with kept groups
            # records the old one until they are gone).
            reuseport_bpffs=res.kept_bpffs or cfg.reuseport.bpffs,
        )
        if before is None or replace(before, applied_at=out.at) != self.owned:
            state_mod.save(self.where.state_path, self.owned)
        if drift:
            self._drift_error = ""
            self._published.drift_repaired()
        self._published.record(apply=out, reuseport=res.reuseport)
        verdict = f"{len(res.summary)} change(s)" if res.changed else "no changes"
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
        for problem in res.problems:
            self._log.error(event, problem, source=source)
        self._applier.settle()  # after the log lines: what lets the next join skip the listing
        return out

    def reload(self, source: str) -> Outcome:
        """Parse the file again and commit it; on any error keep the running config."""
        notify.reloading()
        sha = file_sha256(self.where.config_path)
        try:
            # The same bytes parse to the same config: skip the parser (~80 ms at
            # 1,000 rules) but still plan against the kernel, which restores drift.
            same = self.config is not None and sha == self.sha
            cfg = self.config if same and self.config else load_config(self.where.config_path)
        except ConfigError as exc:
            out = refused(
                self._clock(), source, exc, f"invalid config ({len(exc.issues)} problem(s))"
            )
            self._rejected_sha = sha
            self._published.record(reload=out)
            self._log.error(
                "reload",
                "invalid config; running config kept",
                source=source,
                problems=[str(i) for i in exc.issues],
            )
            notify.ready("running (last reload refused: invalid config)")
            return out
        try:
            applied = self.commit(cfg, sha, source)
        except ControlPlaneError as exc:
            out = refused(self._clock(), source, exc)
            self._rejected_sha = sha
            self._published.record(reload=out)
            notify.ready("running (last reload refused by the kernel)")
            return out
        for sub in self._subsystems():
            sub.reconfigure(cfg)
        self._published.record(reload=applied)
        notify.ready("running")
        return applied

    def file_changed(self) -> Outcome | None:
        """Called when the file's stat changed: reload if its bytes did."""
        sha = file_sha256(self.where.config_path)
        if not sha or sha in (self.sha, self._rejected_sha):
            return None
        return self.reload("file")

    def check_drift(self) -> None:
        """Plan the running config against the kernel again and commit what
        differs (another writer changed our table). Nothing changed: nothing is
        logged or sent."""
        if self.config is None:
            return
        with contextlib.suppress(ControlPlaneError):  # logged by commit (once)
            self.commit(self.config, self.sha, "drift", quiet_if_unchanged=True)

"""The control socket's requests (``status``, ``reload``, ``flows``), answered.

Bad arguments get ``bad_request`` naming the field; a ControlPlaneError is
``unavailable`` with its one line; anything else is our bug: answered as
``internal`` (the agent keeps serving) and logged with its traceback.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from controlplane.agent import protocol
from controlplane.agent.logs import DecisionLog
from controlplane.agent.ports import Observer
from controlplane.agent.snapshot import Outcome, Snapshot
from controlplane.config import Config
from controlplane.core.flowselect import Selector
from controlplane.errors import ControlPlaneError, one_line

FLOWS_LIMIT = 100_000
_SELECTOR_KINDS = ("mac", "ip", "prefix", "dev")


def status_doc(snap: Snapshot) -> dict[str, Any]:
    """The ``status`` answer: the snapshot, opened by the verdict line the CLI prints."""
    from controlplane.core.explain import status_line

    doc = snap.to_json()
    line = status_line(doc["kernel"]) if snap.kernel.at else "kernel not read yet"
    return {"verdict": line, **doc}


def reload_answer(out: Outcome) -> bytes:
    if out.ok:
        return protocol.ok(
            {"changed": out.changed, "summary": list(out.summary), "seconds": out.seconds}
        )
    code: protocol.ErrorCode = "config_invalid" if out.issues else "apply_failed"
    return protocol.error(
        code, f"{out.error}; running config kept", issues=list(out.issues), exit_code=out.exit_code
    )


class ControlDispatch:
    def __init__(
        self,
        *,
        reload: Callable[[str], Outcome],
        refresh_table: Callable[[], None],
        snapshot: Callable[[], Snapshot],
        observer: Observer,
        running: Callable[[], Config | None],
        netns: str | None,
        log: DecisionLog,
    ) -> None:
        self._reload = reload
        self._refresh_table = refresh_table
        self._snapshot = snapshot
        self._observer = observer
        self._running = running
        self._netns = netns
        self._log = log

    def flows(self, args: dict[str, Any]) -> bytes:
        """Kernel truth, read as the CLI reads it without an agent (kernel/flowstate)."""
        limit = args.get("limit", FLOWS_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            return protocol.error("bad_request", "'limit' must be a non-negative integer")
        offloaded = args.get("offloaded", False)
        if not isinstance(offloaded, bool):
            return protocol.error("bad_request", "'offloaded' must be true or false")
        selector = None
        raw = args.get("selector")
        if raw is not None:
            if not isinstance(raw, dict) or raw.get("kind") not in _SELECTOR_KINDS:
                return protocol.error("bad_request", "'selector' must be {kind, value}")
            try:
                selector = Selector.parse(raw["kind"], str(raw.get("value", "")))
            except ValueError as exc:
                return protocol.error("bad_request", str(exc))
        cfg = self._running()
        if cfg is None:
            return protocol.error("unavailable", "no config is running yet")
        flows, truncated = self._observer.flows(
            cfg, self._netns, min(limit, FLOWS_LIMIT), selector, offloaded
        )
        return protocol.ok({"flows": flows, "truncated": truncated, "source": "conntrack"})

    def handle(self, req: protocol.Request) -> bytes:
        try:
            if req.op == "status":
                # The table only (a few ms): a conntrack dump of a big table would
                # hold the loop; its counts come from the periodic view instead.
                self._refresh_table()
                return protocol.ok(status_doc(self._snapshot()))
            if req.op == "reload":
                return reload_answer(self._reload("control"))
            if req.op == "flows":
                return self.flows(req.args)
        except ControlPlaneError as exc:
            return protocol.error("unavailable", one_line(exc))
        except Exception as exc:  # a bug: answer and keep serving; the log says what
            self._log.error(
                "control",
                f"internal error in {req.op}: {type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
            )
            return protocol.error("internal", f"{type(exc).__name__}: {exc}")
        return protocol.error("unknown_op", f"unknown op {req.op!r}")

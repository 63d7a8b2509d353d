"""Prometheus metrics (opt-in) from the agent's published :class:`Snapshot`.

prometheus-client serves the exposition format from its own HTTP thread; our
collector only reads the latest snapshot (an atomic reference), so a scrape
never waits for the loop, enters a namespace or talks to the kernel.

Every series is declared once in :data:`SPECS` (name, type, labels, what is
counted); docs/agent.md's table is checked against it by
tests/unit/test_agent_metrics.py. Prometheus' conventions: one metric per
meaning (never a total next to its own subsets under one name), counters end
in ``_total``, and every labelled series whose label values are known at
start (results, causes, paths, configured flowtables and reuseport groups) is
exported at 0 from the first scrape, so ``absent()`` and ``rate()`` work
before the first event.

Binding: loopback only unless ``allow_remote`` is set. The metrics reveal the
host's topology (device names, flow counts) and are unauthenticated, so
exposing them beyond the host is an explicit decision (the DaemonSet makes it,
binding to the node IP for the cluster's Prometheus, as kube-proxy does).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.agent.invalidation import CAUSE_KINDS
from controlplane.agent.snapshot import Snapshot
from controlplane.errors import ConfigError, ConfigIssue
from controlplane.reuseport import COUNTER_NAMES

RESULTS = ("ok", "failed")
PATHS = ("fast", "classic")


def parse_listen(value: str, allow_remote: bool) -> tuple[str, int]:
    """``127.0.0.1:9108`` / ``[::1]:9108`` -> (host, port); refuses non-loopback unless allowed."""

    def bad(reason: str) -> ConfigError:
        return ConfigError([ConfigIssue("--metrics", f"{value!r}: {reason}")])

    host, sep, port_text = value.rpartition(":")
    # ASCII digits only: str.isdigit() also takes superscripts and other scripts' digits.
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise bad("expected HOST:PORT, e.g. 127.0.0.1:9108")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise bad("port must be within 1..65535")
    host = host.removeprefix("[").removesuffix("]")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise bad("HOST must be an IP address (no name lookups)") from None
    if not addr.is_loopback and not allow_remote:
        raise bad(
            "not a loopback address; metrics are unauthenticated, so pass"
            " --metrics-allow-remote to expose them beyond this host"
        )
    return str(addr), port


@dataclass(frozen=True)
class Spec:
    """One metric: ``name`` as exposed (counters end in ``_total``)."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()

    def family(self) -> GaugeMetricFamily | CounterMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(
                self.name.removesuffix("_total"), self.help, labels=self.labels
            )
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


def _g(name: str, help_text: str, *labels: str) -> Spec:
    return Spec(name, "gauge", help_text, labels)


def _c(name: str, help_text: str, *labels: str) -> Spec:
    return Spec(name, "counter", help_text, labels)


SPECS: tuple[Spec, ...] = (
    _g(
        "offloadctl_agent_info",
        "Always 1; the agent's version and network namespace.",
        "version",
        "netns",
    ),
    _g("offloadctl_agent_start_time_seconds", "When the agent started (Unix time)."),
    _c(
        "offloadctl_applies_total",
        "Commits of the config by the agent (start, reload, re-plan, drift repair), by result.",
        "result",
    ),
    _c(
        "offloadctl_reloads_total",
        "Reload requests (SIGHUP, offloadctl reload, a changed file), by result.",
        "result",
    ),
    _c(
        "offloadctl_drift_repairs_total",
        "Drift checks that found the owned table changed by another writer and restored it.",
    ),
    _g(
        "offloadctl_drift_check_interval_seconds",
        "Seconds between drift checks: the bound on how long another writer's change stays.",
    ),
    _g("offloadctl_last_apply_success", "1 if the agent's last commit succeeded, else 0."),
    _g(
        "offloadctl_last_apply_timestamp_seconds", "When the agent's last commit ended (Unix time)."
    ),
    _g("offloadctl_last_apply_duration_seconds", "How long the agent's last commit took."),
    _g(
        "offloadctl_last_reload_success",
        "1 if the last reload succeeded, else 0 (absent before the first reload).",
    ),
    _g("offloadctl_last_reload_timestamp_seconds", "When the last reload ended (Unix time)."),
    _g("offloadctl_last_reload_duration_seconds", "How long the last reload took."),
    _g("offloadctl_table_present", "1 if the owned nftables table exists in the kernel, else 0."),
    _g(
        "offloadctl_flowtable_devices",
        "Devices hooked by each configured flowtable, as the kernel lists them.",
        "flowtable",
    ),
    _g("offloadctl_conntrack_entries", "Conntrack entries in the namespace (periodic view)."),
    _g(
        "offloadctl_offloaded_flows",
        "Conntrack entries the kernel marks offloaded ([OFFLOAD]) (periodic view).",
    ),
    _c(
        "offloadctl_counter_packets_total",
        "Packets counted by each named counter of the owned table.",
        "name",
    ),
    _c(
        "offloadctl_counter_bytes_total",
        "Bytes counted by each named counter of the owned table.",
        "name",
    ),
    _c(
        "offloadctl_forwarded_packets_total",
        "Forwarded packets by path: fast (flowtable) or classic (forward hook).",
        "path",
    ),
    _c(
        "offloadctl_forwarded_bytes_total",
        "Forwarded bytes by path: fast (flowtable) or classic (forward hook).",
        "path",
    ),
    _g("offloadctl_reuseport_groups", "Reuseport groups the agent owns."),
    _g(
        "offloadctl_reuseport_target_generation",
        "Generation new connections of each group are steered to.",
        "group",
    ),
    _c(
        "offloadctl_reuseport_program_total",
        "Reuseport program decisions by group and outcome.",
        "group",
        "outcome",
    ),
    _c(
        "offloadctl_invalidations_total",
        "Offloaded flows marked stale, by what changed: fdb, neighbour, route or link.",
        "cause",
    ),
    _c(
        "offloadctl_flows_torn_down_total",
        "Stale offloaded flows the agent took off the fast path.",
    ),
    _g(
        "offloadctl_indexed_flows", "Flows in the invalidation engine's index (possibly offloaded)."
    ),
    _c(
        "offloadctl_watch_events_total",
        "Kernel events (link, FDB, neighbour, route, conntrack) the watcher handled.",
    ),
    _c(
        "offloadctl_watch_overflows_total",
        "Netlink receive-buffer overflows (ENOBUFS): events lost, then resynced.",
    ),
    _c("offloadctl_watch_resyncs_total", "Full re-reads of the kernel's tables after lost events."),
    _c(
        "offloadctl_watch_prunes_total",
        "Completed flow-index prune rounds (periodic conntrack re-dumps).",
    ),
    _c(
        "offloadctl_watch_pruned_total",
        "Indexed flows a prune dropped because their conntrack entry was gone.",
    ),
    _c("offloadctl_control_requests_total", "Requests answered on the control socket."),
    _c(
        "offloadctl_control_errors_total",
        "Control requests answered with a protocol error (malformed, too long).",
    ),
    _c(
        "offloadctl_control_refused_total",
        "Control connections refused (not root, too many at once).",
    ),
    _c(
        "offloadctl_control_timeouts_total",
        "Control connections closed for idling past the timeout.",
    ),
)
BY_NAME = {spec.name: spec for spec in SPECS}


def _labelled(name: str, rows: Iterable[tuple[tuple[str, ...], float]]) -> Metric:
    fam = BY_NAME[name].family()
    for labels, value in rows:
        fam.add_metric(list(labels), value)
    return fam


def _single(name: str, value: float) -> Metric:
    return _labelled(name, [((), value)])


def _zeros(keys: Iterable[str], values: Mapping[str, Any]) -> list[tuple[tuple[str, ...], float]]:
    """Every known key (0 when nothing happened yet), then any other key seen."""
    merged = dict.fromkeys(keys, 0.0) | {str(k): float(v) for k, v in values.items()}
    return [((k,), v) for k, v in merged.items()]


def samples(s: Snapshot) -> Iterator[Metric]:
    """The snapshot as metric families, in SPECS order."""
    yield _labelled("offloadctl_agent_info", [((s.version, s.netns or "host"), 1.0)])
    yield _single("offloadctl_agent_start_time_seconds", s.started_at)
    yield _labelled("offloadctl_applies_total", _zeros(RESULTS, s.applies))
    yield _labelled("offloadctl_reloads_total", _zeros(RESULTS, s.reloads))
    yield _single("offloadctl_drift_repairs_total", s.drift_repairs)
    yield _single("offloadctl_drift_check_interval_seconds", s.drift_check_seconds)
    for what, outcome in (("apply", s.last_apply), ("reload", s.last_reload)):
        if outcome is not None:
            yield _single(f"offloadctl_last_{what}_success", 1.0 if outcome.ok else 0.0)
            yield _single(f"offloadctl_last_{what}_timestamp_seconds", outcome.at)
            yield _single(f"offloadctl_last_{what}_duration_seconds", outcome.seconds)
    k = s.kernel
    yield _single("offloadctl_table_present", 1.0 if k.table_present else 0.0)
    devices = {name: len(devs) for name, devs in k.flowtables.items()}
    yield _labelled("offloadctl_flowtable_devices", _zeros(s.flowtable_names, devices))
    yield _single("offloadctl_conntrack_entries", k.conntrack)
    yield _single("offloadctl_offloaded_flows", k.offloaded)
    for unit in ("packets", "bytes"):
        yield _labelled(
            f"offloadctl_counter_{unit}_total",
            [((n,), float(c.get(unit, 0))) for n, c in sorted(k.counters.items())],
        )
    for unit in ("packets", "bytes"):
        by_path = {p: v.get(unit, 0) for p, v in k.forwarded.items()}
        yield _labelled(f"offloadctl_forwarded_{unit}_total", _zeros(PATHS, by_path))
    yield _single("offloadctl_reuseport_groups", len(s.reuseport))
    groups = sorted(set(s.reuseport) | set(k.reuseport))
    yield _labelled(
        "offloadctl_reuseport_target_generation",
        [
            ((g,), float(k.reuseport[g]["target_generation"]))
            for g in groups
            if "target_generation" in k.reuseport.get(g, {})
        ],
    )
    yield _labelled(
        "offloadctl_reuseport_program_total",
        [
            ((g, outcome), v)
            for g in groups
            for (outcome,), v in _zeros(COUNTER_NAMES, k.reuseport.get(g, {}).get("counters", {}))
        ],
    )
    inv = s.invalidation
    yield _labelled("offloadctl_invalidations_total", _zeros(CAUSE_KINDS, inv.get("by_cause", {})))
    yield _single("offloadctl_flows_torn_down_total", inv.get("flows_torn_down", 0))
    yield _single("offloadctl_indexed_flows", inv.get("indexed_flows", 0))
    for key in ("events", "overflows", "resyncs", "prunes", "pruned"):
        yield _single(f"offloadctl_watch_{key}_total", inv.get(key, 0))
    for key in ("requests", "errors", "refused", "timeouts"):
        yield _single(f"offloadctl_control_{key}_total", s.control.get(key, 0))


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from samples(self._snapshot())


def serve(
    listen: tuple[str, int],
    snapshot: Callable[[], Snapshot],
    wrap: Callable[[Any], Any] | None = None,
) -> Callable[[], None]:
    """Start the exporter thread; returns a function that stops it. ``wrap``
    puts other paths in front of the exporter's WSGI app (agent/health.py)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    app = make_wsgi_app(registry)
    server = _serve_wsgi(listen, wrap(app) if wrap is not None else app)

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per scrape
        pass


def _serve_wsgi(listen: tuple[str, int], app: Any) -> WSGIServer:
    """prometheus-client's start_http_server, taking an app instead of a registry."""

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET

    server = make_server(listen[0], listen[1], app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server

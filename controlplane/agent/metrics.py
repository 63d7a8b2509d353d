"""Prometheus metrics (opt-in) from the agent's published :class:`Snapshot`.

prometheus-client serves the exposition format from its own HTTP thread; our
collector only reads the latest snapshot (an atomic reference), so a scrape
never waits for the loop, enters a namespace or talks to the kernel.

Binding: loopback only unless ``allow_remote`` is set. The metrics reveal the
host's topology (device names, flow counts) and are unauthenticated, so
exposing them beyond the host is an explicit decision (the DaemonSet makes it,
binding to the node IP for the cluster's Prometheus, as kube-proxy does).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.agent.snapshot import Snapshot
from controlplane.errors import ConfigError, ConfigIssue


def parse_listen(value: str, allow_remote: bool) -> tuple[str, int]:
    """``127.0.0.1:9108`` / ``[::1]:9108`` -> (host, port); refuses non-loopback unless allowed."""

    def bad(reason: str) -> ConfigError:
        return ConfigError([ConfigIssue("--metrics", f"{value!r}: {reason}")])

    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
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


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        info = GaugeMetricFamily(
            "offloadctl_agent_info", "agent build and namespace", labels=["version", "netns"]
        )
        info.add_metric([s.version, s.netns or "host"], 1)
        yield info
        yield GaugeMetricFamily(
            "offloadctl_agent_start_time_seconds", "agent start (unix time)", value=s.started_at
        )
        yield _by("offloadctl_applies", "applies by result", "result", s.applies)
        yield _by("offloadctl_reloads", "reloads by result", "result", s.reloads)
        for name, outcome in (("apply", s.last_apply), ("reload", s.last_reload)):
            if outcome is None:
                continue
            yield GaugeMetricFamily(
                f"offloadctl_last_{name}_success",
                f"1 if the last {name} succeeded",
                value=1.0 if outcome.ok else 0.0,
            )
            yield GaugeMetricFamily(
                f"offloadctl_last_{name}_timestamp_seconds",
                f"when the last {name} ended",
                value=outcome.at,
            )
            yield GaugeMetricFamily(
                f"offloadctl_last_{name}_duration_seconds",
                f"duration of the last {name}",
                value=outcome.seconds,
            )
        k = s.kernel
        yield GaugeMetricFamily(
            "offloadctl_table_present",
            "1 if the owned table exists",
            value=1.0 if k.table_present else 0.0,
        )
        devices = GaugeMetricFamily(
            "offloadctl_flowtable_devices", "devices in each flowtable", labels=["flowtable"]
        )
        for ft, devs in sorted(k.flowtables.items()):
            devices.add_metric([ft], len(devs))
        yield devices
        yield GaugeMetricFamily(
            "offloadctl_conntrack_entries", "conntrack entries", value=k.conntrack
        )
        yield GaugeMetricFamily(
            "offloadctl_offloaded_flows", "conntrack entries in a flowtable", value=k.offloaded
        )
        packets = CounterMetricFamily(
            "offloadctl_counter_packets", "named nft counters of the owned table", labels=["name"]
        )
        for cname, c in sorted(k.counters.items()):
            packets.add_metric([cname], c.get("packets", 0))
        yield packets
        yield GaugeMetricFamily(
            "offloadctl_reuseport_groups", "reuseport groups the agent owns", value=len(s.reuseport)
        )
        target = GaugeMetricFamily(
            "offloadctl_reuseport_target_generation",
            "generation new connections are steered to",
            labels=["group"],
        )
        outcomes = CounterMetricFamily(
            "offloadctl_reuseport_program",
            "reuseport program outcomes (selected, migrated_*, dropped, fallback)",
            labels=["group", "outcome"],
        )
        for group, facts in sorted(k.reuseport.items()):
            if "target_generation" in facts:
                target.add_metric([group], facts["target_generation"])
            for outcome, count in sorted(facts.get("counters", {}).items()):
                outcomes.add_metric([group, outcome], count)
        yield target
        yield outcomes
        inv = s.invalidation
        yield _by(
            "offloadctl_invalidations",
            "flows invalidated by cause",
            "cause",
            inv.get("by_cause", {}),
        )
        for key in ("events", "overflows", "resyncs", "prunes", "pruned"):
            yield CounterMetricFamily(
                f"offloadctl_watch_{key}", f"watcher {key}", value=float(inv.get(key, 0))
            )
        yield _by(
            "offloadctl_control",
            "control socket requests/errors/refusals/timeouts",
            "kind",
            s.control,
        )


def _by(name: str, doc: str, label: str, values: dict[str, Any]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for key, count in sorted(values.items()):
        fam.add_metric([str(key)], float(count))
    return fam


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

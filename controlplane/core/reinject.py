"""Which torn-down conntrack entries to re-create, and with which timeout.

Pure: the adapter reads the host's conntrack timeout sysctls
(``/proc/sys/net/netfilter/nf_conntrack_*_timeout*``) into
:class:`CtTimeouts` and sends what :func:`reinject_plan` returns.

Why re-create at all: with NAT the first packet after a delete may be a
reply addressed to the router's own address; with no entry it is local
traffic and never reaches the client (see ``kernel/ctnetlink/conntrack.py``).
Only TCP and UDP are re-created: flowtables carry nothing else, and other
entries are re-created by their next packet at no risk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.core.flowpath import Flow

__all__ = ["IPPROTO_TCP", "IPPROTO_UDP", "CtTimeouts", "reinject_plan"]

IPPROTO_TCP = 6
IPPROTO_UDP = 17


@dataclass(frozen=True, slots=True)
class CtTimeouts:
    """Seconds, as the kernel's sysctls hold them (defaults = kernel defaults)."""

    tcp_established: int = 432_000
    udp_stream: int = 120

    def for_proto(self, proto: int) -> int | None:
        """Timeout a re-created entry of ``proto`` gets; None: not re-created."""
        if proto == IPPROTO_TCP:
            return self.tcp_established
        if proto == IPPROTO_UDP:
            # A flow worth offloading saw replies: the kernel treats it as a
            # stream (assured), whose timeout is udp_timeout_stream.
            return self.udp_stream
        return None


def reinject_plan(deleted: Iterable[Flow], timeouts: CtTimeouts) -> list[tuple[Flow, int]]:
    """(entry, timeout) for each deleted entry that must be re-created, in input order."""
    plan: list[tuple[Flow, int]] = []
    for flow in deleted:
        timeout = timeouts.for_proto(flow.orig.proto)
        if timeout is not None and timeout > 0:
            plan.append((flow, timeout))
    return plan

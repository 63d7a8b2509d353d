"""Tests against the real host kernel: thin over the offloadctl pytest plugin
(``controlplane.testing``), which makes and deletes the namespaces."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import pytest

from controlplane.core.flowpath import Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.testing import NetLab, Netns, Topology, Veth, sh
from controlplane.testing.plugin import NOT_ROOT

__all__ = ["sh"]

pytestmark = pytest.mark.netns


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.netns)
    if os.geteuid() != 0:
        # These tests prove behaviour against a real kernel; without root they
        # would prove nothing, so fail loudly instead of skipping.
        raise pytest.UsageError(NOT_ROOT)


@pytest.fixture
def make_netns(netlab: NetLab) -> Callable[[], str]:
    """Factory for fresh namespaces (lo up), all deleted after the test."""
    return netlab.namespace


@pytest.fixture
def netns(netlab: NetLab) -> str:
    return netlab.namespace()


# A namespace with one veth pair, wan0 <-> lan0: enough devices for a NAT config.
ROUTER = Topology(namespaces={"router": Netns()}, links=[Veth("router:wan0", "router:lan0")])


@pytest.fixture
def router(netlab: NetLab) -> str:
    return netlab.build(ROUTER).ns("router")


def create_without_events(netns: str, entries: Iterable[tuple[Flow, int]]) -> int:
    """Create conntrack entries that will never report their end, whoever listens.

    With the default ``nf_conntrack_events=2`` an entry gets the event extension when
    some process anywhere on the machine holds a conntrack event listener: the kernel
    keeps that one flag machine-wide, not per namespace (docs/kernel-facts.md). So
    "made before our listener" is not "silent" while another namespace runs an agent
    or a watch; ``0`` while they are made is, and the default is back for what follows.
    """
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_events=0", netns=netns)
    try:
        with ConntrackSocket(netns) as ct:
            created, failed = ct.create(entries)
    finally:
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_events=2", netns=netns)
    assert failed == 0, f"{failed} entries not created"
    return created

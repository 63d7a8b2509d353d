"""Tests against the real host kernel: thin over the offloadctl pytest plugin
(``controlplane.testing``), which makes and deletes the namespaces."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

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

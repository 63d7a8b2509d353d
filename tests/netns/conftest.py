"""Fixtures for tests against the real host kernel: one fresh namespace per test."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator

import pytest

from controlplane.core.flowpath import Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket

pytestmark = pytest.mark.netns


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.netns)
    if os.geteuid() != 0:
        # These tests prove behaviour against a real kernel; without root they
        # would prove nothing, so fail loudly instead of skipping.
        raise pytest.UsageError("tests/netns needs root (it creates network namespaces)")


def sh(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = list(args)
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Factory for fresh namespaces (lo up), all deleted after the test."""
    created: list[str] = []

    def make() -> str:
        name = f"cpt-{uuid.uuid4().hex[:8]}"
        sh("ip", "netns", "add", name)
        created.append(name)
        sh("ip", "link", "set", "lo", "up", netns=name)
        return name

    yield make
    for name in created:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    return make_netns()


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

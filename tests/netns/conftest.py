"""Fixtures for tests against the real host kernel: one fresh namespace per test."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

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

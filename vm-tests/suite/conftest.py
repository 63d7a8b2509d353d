"""Fixtures for the VM suite (runs inside the guest booted by ``vm-tests/run``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from topology import Topology, build_topology, delete_namespaces

IN_VM = os.environ.get("VMTEST_GUEST") == "1"


def pytest_configure(config: pytest.Config) -> None:
    # Per-test durations are part of the suite's report (TCG makes them worth watching).
    if getattr(config.option, "durations", None) is None:
        config.option.durations = 0
        config.option.durations_min = 0.0


# Per-test limit under TCG (pyproject's is for the host): the slowest VM tests take
# ~5 min with the machine busy, so a hang still fails with its name well before
# vm-tests/run's own --timeout ends the whole boot.
VM_TEST_TIMEOUT = 900


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(VM_TEST_TIMEOUT))
    if IN_VM:
        return
    skip = pytest.mark.skip(reason="VM suite: run it through vm-tests/run (make vm-test)")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Topology]]:
    """Factory: ``make_topology(kind="bridge")`` builds ns1/nsr1/ns2; torn down after the test."""
    built: list[Topology] = []

    def factory(kind: str = "bridge", **kwargs: object) -> Topology:
        topo = build_topology(kind, **kwargs)  # type: ignore[arg-type]
        built.append(topo)
        return topo

    yield factory
    for topo in built:
        topo.teardown()
    delete_namespaces()


@pytest.fixture
def topology(request: pytest.FixtureRequest, make_topology: Callable[..., Topology]) -> Topology:
    """The topology named by indirect parametrization (default: the seed "bridge")."""
    return make_topology(getattr(request, "param", "bridge"))


@pytest.fixture
def seed(make_topology: Callable[..., Topology]) -> Topology:
    """The seed topology: ns1 ↔ nsr1 (br0 with port lan0; wan0) ↔ ns2."""
    return make_topology("bridge")

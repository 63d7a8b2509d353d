"""The pytest plugin (entry point ``pytest11``: ``offloadctl``); see the README, "Test your
config".

* ``netlab`` fixture: ``netlab.build(Topology(...))`` gives a ``Lab`` of fresh namespaces,
  deleted after the test whatever its outcome; namespaces left by a run that died
  (``kill -9``) are deleted when the next run starts.
* ``@pytest.mark.offload_vm``: the test needs flowtables and VLAN devices. It runs here when
  the kernel has them, else inside the project's VM (``controlplane.testing.vm``), else it
  is skipped with both reasons. ``--offload-vm=require|never|always`` changes that: stop
  instead of skipping (CI), never boot the VM, always run in the VM.
* Without root, a session that collects a test needing namespaces stops with one line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING

import pytest

from controlplane.testing import topology, vm
from controlplane.testing.lab import NetLab

if TYPE_CHECKING:
    from controlplane.testing.remote import RemoteRun

MARKER = "offload_vm"
FIXTURE = "netlab"
IN_GUEST = os.environ.get("VMTEST_GUEST") == "1"
NOT_ROOT = (
    "offloadctl testing: these tests create network namespaces and need root "
    "(CAP_NET_ADMIN + CAP_SYS_ADMIN): run pytest as root, e.g. with sudo"
)
_REMOTE: pytest.StashKey[RemoteRun] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("offloadctl", "offloadctl test labs")
    group.addoption(
        "--offload-vm",
        choices=("auto", "require", "never", "always"),
        default="auto",
        help="where @offload_vm tests run: auto = here if the kernel has flowtables and "
        "VLAN devices, else in the VM, else skipped; require = the same but stop with an "
        "error instead of skipping (CI); never = here or skipped; always = in the VM",
    )
    group.addoption(
        "--offload-vm-timeout",
        type=float,
        default=900.0,
        help="seconds one VM run may take (default: 900)",
    )
    group.addoption("--offloadctl-report", default=None, help=argparse.SUPPRESS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: needs flowtables and VLAN devices; runs in the offloadctl VM when the "
        "host kernel lacks them (skipped with the reason when no VM can boot either)",
    )
    if path := config.getoption("offloadctl_report"):  # we are the VM's side of a run
        from controlplane.testing.remote import ReportWriter

        config.pluginmanager.register(ReportWriter(config, path), "offloadctl-report")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0:
        topology.remove_stale()


@cache
def host_lacks() -> str | None:
    """Why this kernel cannot run offload tests (None: it can)."""
    from controlplane.kernel import probe

    missing = [c for c in (probe.flowtables(), probe.vlan()) if not c.ok]
    return "; ".join(f"{c.name}: {c.reason}" for c in missing) or None


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only what will run counts
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [i for i in items if i.get_closest_marker(MARKER) is not None]
    needs_root = marked or [i for i in items if FIXTURE in getattr(i, "fixturenames", ())]
    if needs_root and os.geteuid() != 0:
        raise pytest.UsageError(NOT_ROOT)
    if not marked or IN_GUEST:
        return
    mode = config.getoption("offload_vm")
    lacks = host_lacks() if mode != "always" else "not used (--offload-vm=always)"
    if lacks is None:
        return
    vm_problem = "--offload-vm=never" if mode == "never" else vm.unavailable()
    if vm_problem is not None:
        reason = f"{MARKER}: host kernel: {lacks}; no VM: {vm_problem}"
        if mode == "require":
            raise pytest.UsageError(f"{reason} (--offload-vm=require: not skipping)")
        skip = pytest.mark.skip(reason=reason)
        for item in marked:
            item.add_marker(skip)
        return
    from controlplane.testing.remote import RemoteRun

    config.stash[_REMOTE] = RemoteRun(config, marked, config.getoption("offload_vm_timeout"))
    if config.pluginmanager.hasplugin("timeout"):
        # The first VM test's protocol runs the whole VM session (boot, every test,
        # waiting for another run's VM): bounded by --offload-vm-timeout, not by
        # pytest-timeout's per-test limit, which would end the session mid-run.
        for item in marked:
            item.add_marker(pytest.mark.timeout(0))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    remote = item.config.stash.get(_REMOTE, None)
    if remote is None or item not in remote:
        return None
    remote.replay(item)
    return True


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """Fresh namespaces for this test: ``netlab.build(Topology(...))`` -> ``Lab``,
    ``netlab.namespace()`` -> a bare namespace name. All deleted after the test."""
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.close()

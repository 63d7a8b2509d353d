"""Running marked tests inside the VM and reporting them as if they had run here.

The VM acts like a pytest-xdist worker: the guest runs ``pytest -p offloadctl NODEIDS
--offloadctl-report FILE`` (same interpreter, same checkout: the guest's root is the
host's), writes every test report it makes as a JSON line (pytest's own
``pytest_report_to_serializable``), and the host replays them through its own reporting
hooks, so the terminal, ``-x`` and ``--junitxml`` see ordinary results. One boot runs every
marked test of the session (one per test under xdist: a worker does not know its share).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane.testing import vm


class ReportWriter:
    """Guest side: one JSON line per report (setup, call, teardown of every test)."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config, self.path = config, path

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        with open(self.path, "a") as f:
            f.write(json.dumps(data, default=str) + "\n")


class RemoteRun:
    """The marked tests of this session that go to the VM, and their replayed results."""

    def __init__(self, config: pytest.Config, items: list[pytest.Item], timeout: float) -> None:
        self.config = config
        self.pending = {item.nodeid: item for item in items}
        self.timeout = timeout
        self.reports: dict[str, list[Any]] = {}
        self.failure: dict[str, str] = {}
        self._runs = 0

    def __contains__(self, item: pytest.Item) -> bool:
        return item.nodeid in self.pending or item.nodeid in self.reports

    def replay(self, item: pytest.Item) -> None:
        if item.nodeid not in self.reports and item.nodeid not in self.failure:
            xdist_worker = hasattr(self.config, "workerinput")
            batch = [item.nodeid] if xdist_worker else list(self.pending)
            self._run(batch)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.reports.get(item.nodeid)
        if not reports:
            why = self.failure.get(item.nodeid, "the VM run did not report this test")
            reports = [
                pytest.TestReport(item.nodeid, item.location, {}, "failed", why, "setup"),
            ]
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def _run(self, nodeids: list[str]) -> None:
        for nodeid in nodeids:
            self.pending.pop(nodeid, None)
        self._runs += 1
        results = vm.default_cache_dir() / "results" / f"pytest-{os.getpid()}-{self._runs}"
        results.mkdir(parents=True, exist_ok=True)
        report_file = results / "reports.jsonl"
        report_file.unlink(missing_ok=True)
        root = self.config.rootpath
        command = [
            sys.executable, "-m", "pytest", "-p", "offloadctl", "-p", "no:cacheprovider",
            "-q", "--rootdir", str(root), "--offloadctl-report", str(report_file),
        ]  # fmt: skip
        if self.config.inipath is not None:
            command += ["-c", str(self.config.inipath)]
        command += [f"{root}/{nodeid}" for nodeid in nodeids]
        console = results / vm.CONSOLE_LOG
        self._note(f"running {len(nodeids)} test(s) in the VM (console: {console})")
        cfg = vm.RunConfig(
            command=command,
            results=results,
            cwd=Path(self.config.invocation_params.dir),
            timeout=self.timeout,
            echo=False,
        )
        try:
            status: int | str = vm.run(cfg)
        except vm.VMError as exc:
            status = str(exc)
        if report_file.exists():
            for line in report_file.read_text().splitlines():
                data = json.loads(line)
                rep = self.config.hook.pytest_report_from_serializable(
                    config=self.config, data=data
                )
                if isinstance(rep, pytest.TestReport):
                    self.reports.setdefault(rep.nodeid, []).append(rep)
        tail = _tail(console)
        for nodeid in nodeids:
            if nodeid not in self.reports:
                self.failure[nodeid] = (
                    f"offload_vm: the VM run ended without a result for this test "
                    f"(exit status {status}); last console lines ({console}):\n{tail}"
                )

    def _note(self, text: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[offloadctl] {text}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"

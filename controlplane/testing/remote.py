"""Running marked tests inside the VM and reporting them as if they had run here.

The VM acts like a pytest-xdist worker: the guest runs ``pytest -p offloadctl TESTS
--offloadctl-report FILE`` (same interpreter, same checkout: the guest's root is the
host's), writes every test report it makes as a JSON line (pytest's own
``pytest_report_to_serializable``), and the host replays them through its own reporting
hooks, so the terminal, ``-x`` and ``--junitxml`` see ordinary results. One boot runs every
marked test of the session (one per test under xdist: a worker does not know its share).

A test travels by its key, ``/absolute/file.py::Class::test[param]``: a valid argument for
the guest's pytest, and the same on both sides even where node ids are not (a test file
outside the rootdir gets an id relative to the command-line argument that found it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane.testing import vm


def key(item: pytest.Item) -> str:
    _, sep, inside = item.nodeid.partition("::")
    return f"{item.path}::{inside}" if sep else str(item.path)


class ReportWriter:
    """Guest side: one JSON line per report (setup, call, teardown of every test)."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config, self.path = config, path
        self.keys: dict[str, str] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.keys = {item.nodeid: key(item) for item in items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        line = {"key": self.keys.get(report.nodeid, report.nodeid), "report": data}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


class RemoteRun:
    """The marked tests of this session that go to the VM, and their replayed results."""

    def __init__(self, config: pytest.Config, items: list[pytest.Item], timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self.mine = {item.nodeid for item in items}
        self.pending = [key(item) for item in items]
        self.reports: dict[str, list[Any]] = {}
        self.failure: dict[str, str] = {}
        self._runs = 0

    def __contains__(self, item: pytest.Item) -> bool:
        return item.nodeid in self.mine

    def replay(self, item: pytest.Item) -> None:
        k = key(item)
        if k not in self.reports and k not in self.failure:
            xdist_worker = hasattr(self.config, "workerinput")
            self._run([k] if xdist_worker else self.pending)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.reports.get(k)
        if not reports:
            why = self.failure.get(k, "the VM run did not report this test")
            reports = [pytest.TestReport(item.nodeid, item.location, {}, "failed", why, "setup")]
        for report in reports:
            report.nodeid = item.nodeid  # the host's id, for -x, --lf and the summary
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def _run(self, keys: list[str]) -> None:
        self.pending = [k for k in self.pending if k not in keys]
        self._runs += 1
        results = vm.default_cache_dir() / "results" / f"pytest-{os.getpid()}-{self._runs}"
        results.mkdir(parents=True, exist_ok=True)
        report_file = results / "reports.jsonl"
        report_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "pytest", "-p", "offloadctl", "-p", "no:cacheprovider",
            "-q", "--rootdir", str(self.config.rootpath),
            "--offloadctl-report", str(report_file),
        ]  # fmt: skip
        if self.config.inipath is not None:
            command += ["-c", str(self.config.inipath)]
        console = results / vm.CONSOLE_LOG
        self._note(f"running {len(keys)} test(s) in the VM (console: {console})")
        cfg = vm.RunConfig(
            command=[*command, *keys],
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
            for text in report_file.read_text().splitlines():
                line = json.loads(text)
                rep = self.config.hook.pytest_report_from_serializable(
                    config=self.config, data=line["report"]
                )
                if isinstance(rep, pytest.TestReport):
                    self.reports.setdefault(line["key"], []).append(rep)
        why = f"exit status {status}" if isinstance(status, int) else f"the runner: {status}"
        tail = _tail(console)
        for k in keys:
            if k not in self.reports:
                self.failure[k] = (
                    f"offload_vm: the VM run ended without a result for this test ({why});"
                    f" last console lines ({console}):\n{tail}"
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

"""One error hierarchy that says whose fault it is, and the exit code of each.

- :class:`ConfigError`: the user's input is wrong (exit 2).
- :class:`KernelError`: the kernel refused an operation; carries errno, the
  operation and the payload that failed (exit 5).
- :class:`UnsupportedError`: the running kernel lacks a feature (exit 3).
- :class:`EnvironmentProblem`: missing privileges, namespace, bpffs... (exit 4).
- :class:`PlanError`: our own bug (the renderer produced something inconsistent).
- :class:`ConcurrentChange`: the table changed between our listing and our
  commit; the kernel refused the batch, nothing of ours was committed (exit 5).
- :class:`AfterCommitError`: the transaction *was* committed, a follow-up step
  (tearing down the flows of removed devices) failed (exit 6).
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, field
from enum import IntEnum


class ExitCode(IntEnum):
    """What every ``offloadctl`` verb exits with: the one home of these numbers
    (the README's table is checked against this by tests/unit/test_cli_conventions.py)."""

    OK = 0
    CHANGES = 1  # plan: changes pending; status --config: drift; explain: not on the fast path
    USAGE = 2  # invalid config, unreadable config file, bad flag
    UNSUPPORTED = 3  # the kernel lacks a feature (probe: it cannot offload)
    ENVIRONMENT = 4  # root, namespace, device, bpffs, foreign table, another owner
    KERNEL = 5  # the kernel refused the transaction, or the table changed meanwhile
    AFTER_COMMIT = 6  # committed, but a follow-up step failed
    INTERNAL = 70  # our bug (EX_SOFTWARE)
    INTERRUPTED = 130  # SIGINT


# What each exit code means, in the words --help and the README use.
EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.CHANGES: "plan: changes pending; status --config: drift; explain: not on the"
    " fast path",
    ExitCode.USAGE: "invalid config, unreadable config file, or bad usage",
    ExitCode.UNSUPPORTED: "the kernel lacks a feature (probe: it cannot offload)",
    ExitCode.ENVIRONMENT: "environment: root, namespace, device, bpffs, a table that"
    " is not ours or that an agent manages, show of a missing table",
    ExitCode.KERNEL: "the kernel refused the transaction, or the table changed"
    " meanwhile: nothing committed",
    ExitCode.AFTER_COMMIT: "committed, but a follow-up step (flow teardown) failed",
    ExitCode.INTERNAL: "internal error (OFFLOADCTL_DEBUG=1 shows the traceback)",
    ExitCode.INTERRUPTED: "interrupted (SIGINT)",
}


def one_line(what: BaseException | str) -> str:
    """An error (or a message) as one line (a log line, a control answer, the
    CLI's stderr): its non-blank lines joined by "; "."""
    return "; ".join(line.strip() for line in str(what).splitlines() if line.strip())


class ControlPlaneError(Exception):
    # An error without a more precise class is our bug: never 1, which means
    # "changes pending" to a script running `plan`.
    exit_code: ExitCode = ExitCode.INTERNAL


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}{where}: {self.message}"


class ConfigError(ControlPlaneError):
    exit_code = ExitCode.USAGE

    def __init__(self, issues: list[ConfigIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        super().__init__("\n".join(str(i) for i in issues))


class UnreadableConfig(ConfigError):
    """The config file itself cannot be read (missing, permission denied): one
    line naming the file and why, not "invalid config"."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__([ConfigIssue(source, reason)], source)


class PlanError(ControlPlaneError):
    exit_code = ExitCode.INTERNAL


class EnvironmentProblem(ControlPlaneError):
    """Something around us is missing: root, a namespace, bpffs, a device."""

    exit_code = ExitCode.ENVIRONMENT


class UnsupportedError(ControlPlaneError):
    """The running kernel cannot do what the config asks (e.g. no flowtables)."""

    exit_code = ExitCode.UNSUPPORTED


@dataclass
class KernelError(ControlPlaneError):
    operation: str
    message: str
    errno: int | None = None
    payload: object = field(default=None, repr=False)

    exit_code = ExitCode.KERNEL

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        code = f" ({_errno.errorcode.get(self.errno, self.errno)})" if self.errno else ""
        return f"{self.operation}: {self.message}{code}"


class ConcurrentChange(KernelError):
    """Our compare-and-swap failed: someone changed the table since we listed it."""


class AfterCommitError(ControlPlaneError):
    """The ruleset was committed; what had to follow it failed. Not exit 5: the
    previous ruleset is *not* kept, the new one is in place."""

    exit_code = ExitCode.AFTER_COMMIT

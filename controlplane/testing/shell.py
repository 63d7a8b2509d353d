"""Commands for tests: ``sh("ip", "link", netns=NS)`` returns stdout or fails the test."""

from __future__ import annotations

import subprocess


class CommandFailed(AssertionError):
    """A command a test relied on failed: an AssertionError, so pytest reports it as the
    test's failure with the command line and its stderr."""


def sh(*args: str, netns: str | None = None, check: bool = True, input: str | None = None) -> str:
    """Run ARGS (inside network namespace NETNS through ``ip netns exec``); return stdout."""
    cmd = list(args)
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, input=input)
    if check and res.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout

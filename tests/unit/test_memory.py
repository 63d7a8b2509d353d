"""controlplane.kernel.memory against this kernel and libc (each in a fresh process:
the THP flag is process-wide and inherited, it must not leak into the test runner)."""

from __future__ import annotations

import subprocess
import sys

PROBE = (
    "from controlplane.kernel.memory import (\n"
    "    disable_thp, fix_malloc_thresholds, release_free_heap, thp_disabled)\n"
    "before = thp_disabled()\n"
    "print(before, disable_thp(), thp_disabled(), release_free_heap(), fix_malloc_thresholds())\n"
    "print(next(l for l in open('/proc/self/status') if l.startswith('THP_enabled')).split()[1])"
)


def test_thp_flag_set_and_read_back_and_glibc_knobs_taken() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "False True True True True"
    assert out[1] == "0"  # what the kernel reports for the process, not only prctl's answer

"""The agent's own memory: two process-wide knobs for a long-running Python heap.

Why (docs/agent.md, "Memory"):

- :func:`disable_thp`: ``prctl(PR_SET_THP_DISABLE)``. With transparent huge pages
  in mode ``always`` (Debian's default) an anonymous mapping is backed by 2 MiB
  pages, so a sparsely used Python heap (1 MiB obmalloc arenas, malloc's heaps)
  is resident by the 2 MiB. The flag is per process, inherited by children
  (Documentation/admin-guide/mm/transhuge.rst, "prctl"; prctl(2)).
- :func:`release_free_heap`: glibc's ``malloc_trim(0)`` hands free pages of every
  malloc arena back to the kernel (malloc_trim(3)). A conntrack dump frees
  megabytes of buffers and temporaries that malloc otherwise keeps: its dynamic
  trim threshold grows with the largest block it unmapped (mallopt(3),
  M_TRIM_THRESHOLD), and a helper thread's arena is trimmed only from its top.

Both are best-effort: they change how much memory is resident, never what the
program computes, so where they are missing (another libc, an old kernel) the
answer is False and nothing else differs.
"""

from __future__ import annotations

import ctypes

__all__ = ["disable_thp", "release_free_heap", "thp_disabled"]

PR_SET_THP_DISABLE = 41  # include/uapi/linux/prctl.h
PR_GET_THP_DISABLE = 42

_libc = ctypes.CDLL(None, use_errno=True)


def disable_thp() -> bool:
    """No transparent huge pages for this process's later faults (and its children);
    True when the kernel accepted it."""
    return bool(_libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0)


def thp_disabled() -> bool:
    """The flag as the kernel holds it (``PR_GET_THP_DISABLE``)."""
    return bool(_libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1)


def release_free_heap() -> bool:
    """Return malloc's free pages to the kernel; True when glibc's ``malloc_trim``
    exists (whether it found pages to release or not)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True

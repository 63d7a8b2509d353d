"""The agent's own memory: three process-wide knobs for a long-running Python heap.

Why (docs/agent.md, "Memory"):

- :func:`disable_thp`: ``prctl(PR_SET_THP_DISABLE)``. With transparent huge pages
  in mode ``always`` (Debian's kernels, the VM's 6.1) an anonymous mapping is backed by 2 MiB
  pages, so a sparsely used Python heap (1 MiB obmalloc arenas, malloc's heaps)
  is resident by the 2 MiB. The flag is per process, inherited by children
  (PR_SET_THP_DISABLE(2const), prctl(2); the modes: the kernel's
  Documentation/admin-guide/mm/transhuge.rst).
- :func:`release_free_heap`: glibc's ``malloc_trim(0)`` hands free pages of every
  malloc arena back to the kernel (malloc_trim(3)). A conntrack dump frees
  megabytes of buffers and temporaries that malloc otherwise keeps: its dynamic
  trim threshold grows with the largest block it unmapped (mallopt(3),
  M_TRIM_THRESHOLD), and a helper thread's arena is trimmed only from its top.

- :func:`fix_malloc_thresholds`: ``mallopt(M_TRIM_THRESHOLD)`` and
  ``mallopt(M_MMAP_THRESHOLD)`` at their defaults (128 KiB), set explicitly: that
  turns glibc's dynamic adjustment off (mallopt(3)), so a block of 128 KiB or more
  is its own mapping, unmapped when freed, and free memory at a heap's top goes back
  at once, on whichever thread frees it (the drift check's nft listing, a view).

All are best-effort: they change how much memory is resident, never what the
program computes, so where they are missing (another libc, an old kernel) the
answer is False and nothing else differs.
"""

from __future__ import annotations

import ctypes

__all__ = ["disable_thp", "fix_malloc_thresholds", "release_free_heap", "thp_disabled"]

PR_SET_THP_DISABLE = 41  # include/uapi/linux/prctl.h
PR_GET_THP_DISABLE = 42
M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MALLOC_THRESHOLD = 128 * 1024  # both defaults (mallopt(3))

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


def fix_malloc_thresholds() -> bool:
    """glibc's trim and mmap thresholds fixed at their defaults; True when glibc took both."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return False
    return all(mallopt(p, MALLOC_THRESHOLD) == 1 for p in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD))

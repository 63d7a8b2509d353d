"""Suite-wide hypothesis settings.

No per-example deadline: a property test asserts behaviour, not speed (speed goals live in
`make bench`, hangs are bounded by pytest-timeout). On a loaded 2-core CI machine a GC pause
or a descheduled worker can push one ~2 ms example past hypothesis' default 200 ms deadline,
which it reports as a flaky failure (seen once each in two full unit runs of
tests/unit/test_flowprune.py that passed alone and over 25 seeds).
"""

from hypothesis import settings

settings.register_profile("offloadctl", deadline=None)
settings.load_profile("offloadctl")

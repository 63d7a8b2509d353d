"""Numbers typed by people or handed over in environment variables."""

from __future__ import annotations

import re

__all__ = ["ascii_decimal"]

_DECIMAL = re.compile(r"[0-9]{1,20}")


def ascii_decimal(text: str) -> int | None:
    """The value of *text* if it is 1-20 ASCII digits, else None.

    ``str.isdigit()`` is not that test: it accepts '¹' (on which ``int()`` raises)
    and other scripts' digits, and it puts no bound on the length."""
    return int(text) if _DECIMAL.fullmatch(text) else None

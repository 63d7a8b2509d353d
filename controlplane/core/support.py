"""Remembering a kernel's "can you do this" answer.

Support does not go away under a running process, so a yes is kept for good
(the probe is a check transaction: ~8 ms on the host, ~80 ms under TCG, per
apply otherwise); a no is asked again, since a module may be loaded meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SupportMemo"]

Answer = tuple[bool, str]  # (supported, why / why not)


class SupportMemo:
    def __init__(self) -> None:
        self.known: Answer | None = None  # a yes, once the kernel said it

    def learn(self, answer: Answer) -> Answer:
        if answer[0]:
            self.known = answer
        return answer

    def ask(self, probe: Callable[[], Answer]) -> Answer:
        return self.known if self.known is not None else self.learn(probe())

"""Is this table ours? One decision, made by every verb that writes. Pure.

The proof is a marker the table itself carries: its comment,
``managed by offloadctl; schema N`` (:data:`nft.TABLE_MARKER`). nft sets a
table's comment only when it creates the table (``add table`` on an existing
table leaves the comment alone; kernels >= 5.10, nft >= 0.9.7), so the
marker says who created the table, not what it happens to contain today.

- **absent**: apply creates it; flush has nothing to do.
- **ours** (marker, our schema): whatever else it holds (hand-added chains,
  sets, rules) is drift, which apply removes.
- **foreign** (anything else: no comment, another comment, a comment that
  only resembles the marker such as ``schema 01``, an Arabic-Indic one or
  ``schema ¹``) and **newer** (the marker prefix followed by a plain ASCII
  schema number we do not know): never modified, flushed or adopted. Exit 4.

The marker is compared byte for byte: a number is only a schema if it is
written as we write one (ASCII digits, no leading zero), so no spelling of
"1" other than ``1`` counts as ours.

Tables of the schema before markers (every rule tagged ``cp:``) were adopted
for one release (0.1.0). That ended: the tags are comments anyone can type,
so adopting on them let a hand-made table be deleted by ``apply``/``flush``.
Such a table is now foreign; delete it by hand once and apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from controlplane.core import nft
from controlplane.core.plan import Observed
from controlplane.errors import EnvironmentProblem

__all__ = ["Ownership", "Verdict", "decide", "require_writable"]


class Ownership(StrEnum):
    ABSENT = "absent"
    OURS = "ours"
    FOREIGN = "foreign"
    NEWER = "newer"


@dataclass(frozen=True)
class Verdict:
    ownership: Ownership
    reason: str

    @property
    def writable(self) -> bool:
        return self.ownership in (Ownership.ABSENT, Ownership.OURS)


# How we write a schema number: ASCII digits, no leading zero, bounded (so int()
# never sees a Unicode digit, a superscript or 5,000 digits).
_SCHEMA_NUMBER = re.compile(r"[1-9][0-9]{0,8}")


def _schema(marker: str | None) -> int | None:
    if marker is None or not marker.startswith(nft.MARKER_PREFIX):
        return None
    rest = marker[len(nft.MARKER_PREFIX) :]
    return int(rest) if _SCHEMA_NUMBER.fullmatch(rest) else None


def decide(observed: Observed | None) -> Verdict:
    if observed is None:
        return Verdict(Ownership.ABSENT, "the table does not exist")
    if observed.marker == nft.TABLE_MARKER:
        return Verdict(Ownership.OURS, "the table carries offloadctl's marker")
    schema = _schema(observed.marker)
    if schema is not None:
        return Verdict(
            Ownership.NEWER,
            f"the table was written by a newer offloadctl (schema {schema}, we know"
            f" {nft.SCHEMA}); upgrade offloadctl",
        )
    if observed.marker is not None:
        return Verdict(
            Ownership.FOREIGN, f"the table's comment is {observed.marker!r}, not our marker"
        )
    if observed.rules and not observed.untagged_rules:
        return Verdict(
            Ownership.FOREIGN,
            "it carries no ownership marker (every rule is tagged cp:, as offloadctl 0.1.0"
            " wrote them before markers, but tags are comments anyone can type)",
        )
    return Verdict(
        Ownership.FOREIGN,
        "the table was not created by offloadctl (it carries no ownership marker)",
    )


def require_writable(ref: nft.TableRef, verdict: Verdict) -> None:
    if not verdict.writable:
        raise EnvironmentProblem(
            f"table {ref.spec} is not ours: {verdict.reason}; offloadctl never modifies,"
            " flushes or adopts it (pick another table name, or delete it yourself)"
        )

"""Is this table ours? One decision, made by every verb that writes. Pure.

The proof is a marker the table itself carries: its comment,
``managed by offloadctl; schema N`` (:data:`nft.TABLE_MARKER`). nft sets a
table's comment only when it creates the table (``add table`` on an existing
table leaves the comment alone; kernels >= 5.10, nft >= 0.9.7), so the
marker says who created the table, not what it happens to contain today.

- **absent**: apply creates it; flush has nothing to do.
- **ours** (marker, our schema): whatever else it holds (hand-added chains,
  sets, rules) is drift, which apply removes.
- **legacy** (no marker, written by offloadctl before table markers: at least
  one rule, every rule tagged ``cp:``, and nothing but chains, counters,
  flowtables): apply adopts it by deleting and recreating it in one
  transaction (a one-time teardown of its offloaded flows, announced in the
  plan); flush deletes it.
- **foreign** (anything else without the marker, including an empty table or
  one with chains or sets but no rules) and **newer** (our marker, a schema
  we do not know): never modified, flushed or adopted. Exit 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from controlplane.core import nft
from controlplane.core.plan import Observed
from controlplane.errors import EnvironmentProblem

__all__ = ["Ownership", "Verdict", "decide", "require_writable"]


class Ownership(StrEnum):
    ABSENT = "absent"
    OURS = "ours"
    LEGACY = "legacy"
    FOREIGN = "foreign"
    NEWER = "newer"


@dataclass(frozen=True)
class Verdict:
    ownership: Ownership
    reason: str

    @property
    def writable(self) -> bool:
        return self.ownership in (Ownership.ABSENT, Ownership.OURS, Ownership.LEGACY)


def _schema(marker: str | None) -> int | None:
    if marker is None or not marker.startswith(nft.MARKER_PREFIX):
        return None
    rest = marker[len(nft.MARKER_PREFIX) :]
    return int(rest) if rest.isdigit() else None


def decide(observed: Observed | None) -> Verdict:
    if observed is None:
        return Verdict(Ownership.ABSENT, "the table does not exist")
    schema = _schema(observed.marker)
    if schema == nft.SCHEMA:
        return Verdict(Ownership.OURS, "the table carries offloadctl's marker")
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
    if (
        observed.rules
        and not observed.untagged_rules
        and not observed.objects
        and observed.serial_handle is None
        and not observed.unknown
    ):
        return Verdict(
            Ownership.LEGACY,
            "written by an offloadctl from before table markers (every rule tagged)",
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

"""Transaction operations (core/nft.py): each is declared by a Form; the text
and JSON one writer makes of every kind are pinned by nft/golden/operations.txt
(byte for byte what the hand-written methods made before, issue 16)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from controlplane.core import nft
from controlplane.errors import PlanError

GOLDEN = Path(__file__).parents[2] / "nft" / "golden" / "operations.txt"
REF = nft.TableRef("inet", "t")


def _ops() -> list[nft.Op]:
    ft = nft.Flowtable("ft", -5, ("a", "b"), hw_offload=True, counter=True)
    chain = nft.Chain("forward", "filter", nft.Hook.FORWARD, 0, "drop")
    stmts = (nft.match_meta("iifname", ["a"]), nft.counter(), nft.verdict("accept"))
    return [
        nft.CreateTable(),
        nft.ResetTableFlags(),
        nft.DeleteTable(),
        nft.DeleteTable(7),
        nft.AddSerial(3),
        nft.SwapSerial(3, 4),
        *[nft.DeleteByHandle(kind, 9, "nm") for kind in nft.ObjKind],
        nft.AddFlowtable(ft),
        nft.AddFlowtable(nft.Flowtable("ft0", 0, ())),
        nft.DeleteFlowtableDevices("ft", ("a", "b")),
        nft.DeleteFlowtable("ft"),
        nft.AddCounter("c"),
        nft.DeleteCounter("c"),
        nft.AddChain(chain),
        nft.FlushChain("forward"),
        nft.DeleteChain("forward"),
        nft.AddRule(nft.Rule("forward", stmts, "x")),
    ]


def _shown(op: nft.Op) -> str:
    try:
        doc = json.dumps(op.json(REF))
    except NotImplementedError as exc:
        doc = f"(no JSON: {exc})"
    return f"{type(op).__name__} needs_text={op.needs_text}\n{op.text(REF)}\n{doc}\n"


def test_every_operation_kind_renders_as_pinned() -> None:
    got = "\n".join(_shown(op) for op in _ops())
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert GOLDEN.read_text() == got, f"{GOLDEN} differs; UPDATE_GOLDEN=1 to regenerate"


def test_the_pinned_list_has_every_operation_kind() -> None:
    kinds = {cls for cls in vars(nft).values() if isinstance(cls, type) and issubclass(cls, nft.Op)}
    assert kinds - {nft.Op, nft.NamedOp} == {type(op) for op in _ops()}


@pytest.mark.parametrize(
    "make",
    [
        lambda: nft.AddCounter("a b"),
        lambda: nft.DeleteChain("add"),
        lambda: nft.DeleteFlowtableDevices("ft", ("a b",)),
        lambda: nft.DeleteByHandle(nft.ObjKind.CT_HELPER, 1, "x y"),
    ],
)
def test_names_that_fail_the_config_parser_are_our_bug(make: object) -> None:
    with pytest.raises(PlanError):
        make()  # type: ignore[operator]


def test_a_set_by_handle_is_not_checked_as_a_name() -> None:
    op = nft.DeleteByHandle(nft.ObjKind.MAP, 12, "not a name")
    assert op.text(REF) == "delete set inet t handle 12"


def test_a_transaction_is_its_operations_one_per_line() -> None:
    t = nft.Transaction(REF, (nft.CreateTable(), nft.AddSerial(1)))
    assert t.to_text().splitlines() == [
        nft.CreateTable().text(REF),
        *nft.AddSerial(1).text(REF).splitlines(),
    ]
    assert not t.needs_text
    assert nft.Transaction(REF, (nft.DeleteFlowtableDevices("ft", ("a",)),)).needs_text

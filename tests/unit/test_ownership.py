"""Issue 15 (F1-F5) without root: the marker matched byte for byte, every kind
of hand-added object removed in an order the (fake) kernel accepts, table
flags as declared state, a table made by someone else never written."""

from __future__ import annotations

import errno

import pytest

from controlplane.core import nft, ownership
from controlplane.core.plan import Observed, ObservedFlowtable, make_plan, parse_listing
from controlplane.core.render import render
from controlplane.errors import ConcurrentChange, KernelError
from controlplane.loader import parse_config
from controlplane.service import RulesetService
from tests.unit.fake_nft import FakeNft
from tests.unit.test_service import REF, _ports, cfg

NAT = parse_config({"version": 1, "nat": {"masquerade": [{"oifname": "wan0"}]}})

# F1/F2: comments that look like our marker but are not it, byte for byte.
LOOKALIKES = [
    "managed by offloadctl; schema 01",
    "managed by offloadctl; schema \u0661",  # Arabic-Indic digit one
    "managed by offloadctl; schema " + "0" * 5000 + "1",
    "managed by offloadctl; schema \u00b9",  # superscript one: int() raises
    "managed by offloadctl; schema \u00b2",
    "managed by offloadctl; schema 1 ",
    " managed by offloadctl; schema 1",
    "managed by offloadctl; schema +1",
    "managed by offloadctl; schema 1\u200b",
    "managed by offloadctl; schema " + "9" * 5000,
    "Managed by offloadctl; schema 1",
    "managed by offloadctl; schema ",
]


@pytest.mark.parametrize("marker", LOOKALIKES)
def test_a_marker_that_is_not_exactly_ours_is_not_ours(marker: str) -> None:
    verdict = ownership.decide(Observed(marker=marker))
    assert verdict.ownership is ownership.Ownership.FOREIGN
    assert not verdict.writable


def test_our_marker_and_a_newer_schema() -> None:
    assert ownership.decide(Observed(marker=nft.TABLE_MARKER)).ownership is ownership.Ownership.OURS
    newer = ownership.decide(Observed(marker=nft.MARKER_PREFIX + "2"))
    assert newer.ownership is ownership.Ownership.NEWER and not newer.writable


def test_listed_comment_is_taken_as_written() -> None:
    head = "table inet offloadctl { # handle 4\n"
    doubled = parse_listing(head + '\tcomment "managed by offloadctl; schema 1""\n}\n')
    assert doubled.marker != nft.TABLE_MARKER and doubled.unknown
    spaced = parse_listing(head + '\tcomment " managed by offloadctl; schema 1"\n}\n')
    assert spaced.marker == " managed by offloadctl; schema 1"
    ours = parse_listing(head + f'\tcomment "{nft.TABLE_MARKER}"\n\tflags dormant\n}}\n')
    assert ours.marker == nft.TABLE_MARKER and ours.flags == ("dormant",) and ours.handle == 4


def test_tagged_rules_without_marker_are_foreign() -> None:
    # The pre-marker schema's adoption ended (see core/ownership.py).
    listing = (
        "table inet offloadctl { # handle 4\n\tchain c { # handle 1\n"
        '\t\taccept comment "cp:000000000000 x" # handle 2\n\t}\n}\n'
    )
    verdict = ownership.decide(parse_listing(listing))
    assert verdict.ownership is ownership.Ownership.FOREIGN and "cp:" in verdict.reason


def _applied() -> tuple[FakeNft, RulesetService]:
    """A fake kernel holding our applied table, and the service that applied it."""
    fake = FakeNft()
    svc = RulesetService(_ports(fake)[0])
    svc.apply(cfg())
    return fake, svc


# F3: creation is one conditional step.


def test_a_table_created_by_hand_after_the_listing_is_never_written() -> None:
    fake = FakeNft()
    ports, _ = _ports(fake)
    fake.before_run.append(fake.hand_create_table)  # between our listing and our commit
    with pytest.raises(KernelError) as info:
        RulesetService(ports).apply(cfg())
    assert info.value.errno == errno.EEXIST or isinstance(info.value, ConcurrentChange)
    assert fake.table is not None and fake.table.marker is None
    assert not fake.table.chains and fake.table.serial is None


def test_creation_is_create_table_with_the_marker() -> None:
    text = make_plan(render(NAT), None).transaction.to_text()
    assert text.startswith(f'create table inet offloadctl {{ comment "{nft.TABLE_MARKER}"; }}\n')


def test_a_table_replaced_by_hand_is_not_deleted_by_a_rebuild() -> None:
    fake, _ = _applied()
    assert fake.table is not None
    fake.table.serial = None  # our serial gone: the next apply rebuilds
    observed = fake.list_table(REF)
    the_plan = make_plan(render(cfg()), observed)
    assert isinstance(the_plan.ops[0], nft.DeleteTable) and the_plan.ops[0].handle
    fake.table = None
    fake.hand_create_table()  # same name, another handle
    with pytest.raises(KernelError) as info:
        fake.run(the_plan.transaction)
    assert info.value.errno == errno.ENOENT
    assert fake.table is not None and fake.table.marker is None


# F4: every kind of object nft lists in a table.


@pytest.mark.parametrize("kind", list(nft.ObjKind))
def test_every_kind_of_hand_added_object_is_removed(kind: nft.ObjKind) -> None:
    fake, svc = _applied()
    if kind is nft.ObjKind.CHAIN:
        fake.hand_add_chain("hand")
    elif kind is nft.ObjKind.FLOWTABLE:
        assert fake.table is not None
        fake.table.flowtables["hand"] = ObservedFlowtable("hand", 0, frozenset(), handle=99)
    else:
        fake.hand_add_object(kind, "hand")
    the_plan = svc.plan(cfg())
    assert any(line.startswith(f"- {kind.value} hand") for line in the_plan.summary)
    assert svc.apply(cfg()).committed
    t = fake.table
    assert t is not None and not t.objects and not t.sets
    assert "hand" not in t.chains and "hand" not in t.counters and "hand" not in t.flowtables
    assert svc.plan(cfg()).empty


def test_deletes_go_sets_then_chains_then_objects() -> None:
    fake, svc = _applied()
    fake.hand_add_object(nft.ObjKind.CT_HELPER, "h")
    fake.hand_add_object(nft.ObjKind.MAP, "m")
    fake.hand_add_chain("c")
    kinds = [op.kind for op in svc.plan(cfg()).ops if isinstance(op, nft.DeleteByHandle)]
    assert kinds == [nft.ObjKind.MAP, nft.ObjKind.CHAIN, nft.ObjKind.CT_HELPER]


def test_an_object_whose_name_cannot_be_a_command_rebuilds_the_table() -> None:
    fake, svc = _applied()
    fake.hand_add_object(nft.ObjKind.CT_TIMEOUT, "a b")
    the_plan = svc.plan(cfg())
    assert any("rebuilt" in line for line in the_plan.summary)
    assert svc.apply(cfg()).committed
    assert fake.table is not None and not fake.table.objects
    assert fake.table.marker == nft.TABLE_MARKER and svc.plan(cfg()).empty


def test_map_and_ct_deletes_are_in_nfts_grammar() -> None:
    ref = nft.TableRef("inet", "t")
    assert nft.DeleteByHandle(nft.ObjKind.MAP, 7, "m").text(ref) == "delete set inet t handle 7"
    helper = nft.DeleteByHandle(nft.ObjKind.CT_HELPER, 7, "h")
    assert helper.text(ref) == "delete ct helper inet t h"


# F5: table flags are declared state.


def test_a_dormant_table_is_drift_and_apply_clears_it() -> None:
    fake, svc = _applied()
    fake.hand_set_flags("dormant")
    the_plan = svc.plan(cfg())
    assert not the_plan.empty and any("dormant" in d for d in the_plan.drift)
    assert isinstance(the_plan.ops[0], nft.SwapSerial)
    assert isinstance(the_plan.ops[1], nft.ResetTableFlags)
    assert svc.apply(cfg()).committed
    assert fake.table is not None and fake.table.flags == ()
    assert svc.plan(cfg()).empty

"""The agent's split pieces against fakes: the kernel-view merge, the link-cache
facts and link-name hint, the remembered flowtable support, topology re-plans."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.agent.snapshot import KernelView
from controlplane.agent.views import newer_view, with_table
from controlplane.config import Config, Vlan
from controlplane.core.flowpath import Link
from controlplane.core.linkfacts import bridge_link, facts_from_links, links_by_name_hint
from controlplane.core.preflight import LinkInfo
from controlplane.core.support import SupportMemo
from controlplane.errors import EnvironmentProblem
from controlplane.service.applier import _LinkNamesFromHint, _SupportCached
from tests.unit.fake_nft import FakeNft

TIMES = st.floats(0, 100, allow_nan=False)


@given(TIMES, TIMES, TIMES, TIMES)
def test_the_newer_reading_of_each_part_wins(
    at: float, table_at: float, v_at: float, v_table: float
) -> None:
    current = KernelView(at=at, table_at=table_at, conntrack=1, flowtables={"ft": ("old",)})
    view = KernelView(at=v_at, table_at=v_table, conntrack=2, flowtables={"ft": ("new",)})
    merged = newer_view(current, view)
    if v_at <= at:
        assert merged is None  # an older full view never replaces a newer one
        return
    assert merged is not None and merged.conntrack == 2 and merged.at == v_at
    fresher = current if table_at > v_table else view
    assert merged.table_at == max(table_at, v_table) and merged.flowtables == fresher.flowtables


def test_a_table_reading_keeps_the_full_views_error_until_it_is_newer() -> None:
    current = KernelView(at=5.0, table_at=5.0, conntrack=3, error="conntrack dump: EPERM")
    part = KernelView(table_at=4.0, table_present=True, flowtables={"ft": ("a",)})
    kept = with_table(current, part)
    assert kept.error == "conntrack dump: EPERM" and kept.conntrack == 3
    assert kept.flowtables == {"ft": ("a",)} and kept.table_present
    assert with_table(current, KernelView(table_at=6.0)).error is None


def test_support_is_remembered_once_it_said_yes() -> None:
    answers = iter([(False, "no nf_flow_table"), (True, "ok")])
    asked: list[int] = []

    def probe() -> tuple[bool, str]:
        asked.append(1)
        return next(answers)

    memo = SupportMemo()
    assert memo.ask(probe) == (False, "no nf_flow_table")
    assert memo.ask(probe) == (True, "ok")  # a no is asked again
    assert memo.ask(probe) == (True, "ok") and len(asked) == 2  # a yes is not


def test_the_nft_port_asks_support_once() -> None:
    nft = FakeNft()
    asked: list[int] = []
    real = nft.flowtables_supported

    def counting() -> tuple[bool, str]:
        asked.append(1)
        return real()

    nft.flowtables_supported = counting  # type: ignore[method-assign]
    cached = _SupportCached(nft)
    assert cached.flowtables_supported() == cached.flowtables_supported() == real()
    assert len(asked) == 1


BR = Link(1, "br0", "bridge")
LINKS = {1: BR, 2: Link(2, "p1", "veth", master=1), 3: Link(3, "p0", "veth", master=1)}
CFG = Config.model_validate(
    {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": ["wan0"], "bridges": ["br0"]}],
        "policies": [{"name": "lan-wan", "flowtable": "ft"}],
    }
)


def test_facts_from_the_link_cache() -> None:
    facts = facts_from_links(CFG, LINKS)
    assert facts.bridge_ports == {"br0": ("p0", "p1")} and set(facts.links) == {"br0", "p0", "p1"}
    with pytest.raises(EnvironmentProblem, match="flowtable ft: bridge br0: not a bridge"):
        facts_from_links(CFG, {1: Link(1, "br0", "veth")})
    with pytest.raises(EnvironmentProblem, match="flowtable ft: bridge br0: no such device"):
        facts_from_links(CFG, {})
    assert bridge_link("ft", "br0", BR) is BR


class FakeRtnl:
    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def links(self, vlan_names: Iterable[str] = ()) -> Mapping[str, LinkInfo]:
        self.asked.append(list(vlan_names))
        return {"kernel": LinkInfo("veth")}

    def bridge_ports(self, bridge: str) -> list[str]:
        return []

    def create_vlans(self, vlans: list[Vlan]) -> list[str]:
        return []

    def remove_links(self, names: list[str]) -> None: ...

    def vlans_supported(self) -> tuple[bool, str]:
        return True, ""


def test_the_link_name_hint_serves_one_listing_without_vlans() -> None:
    assert links_by_name_hint(None, []) is None
    assert links_by_name_hint({"a"}, ["v1"]) is None  # VLAN details: the kernel
    assert links_by_name_hint({"a"}, []) == {"a": LinkInfo(None)}
    inner = FakeRtnl()
    rtnl = _LinkNamesFromHint(inner)
    rtnl.names = frozenset({"p0"})
    assert rtnl.links() == {"p0": LinkInfo(None)} and inner.asked == []
    assert rtnl.links() == {"kernel": LinkInfo("veth")}  # for one listing only
    rtnl.names = frozenset({"p0"})
    assert rtnl.links(["v1"]) == {"kernel": LinkInfo("veth")} and inner.asked[-1] == ["v1"]

"""The apply orchestration against fakes, without root: ownership, lock, VLAN
rollback, teardown after commit, preflight shared by plan and apply."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pytest

from controlplane.config import Config, Vlan
from controlplane.core import nft
from controlplane.core.preflight import LinkInfo
from controlplane.core.render import Facts
from controlplane.errors import (
    AfterCommitError,
    ConcurrentChange,
    EnvironmentProblem,
    KernelError,
    UnsupportedError,
)
from controlplane.loader import parse_config
from controlplane.service import Ports, RulesetService
from tests.unit.fake_nft import FakeChain, FakeNft, FakeRule, FakeTable

REF = nft.TableRef("inet", "offloadctl")


@dataclass
class Report:
    deleted: int = 3
    examined: int = 5
    recreated: int = 3
    elapsed: float = 0.001


@dataclass
class FakeRtnl:
    names: set[str] = field(default_factory=lambda: {"lo", "wan0", "lan0", "a", "b"})
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    vlan_support: tuple[bool, str] = (True, "")

    def links(self, vlan_names: Iterable[str] = ()) -> Mapping[str, LinkInfo]:
        return {n: LinkInfo(None) for n in self.names}

    def bridge_ports(self, bridge: str) -> list[str]:
        return []

    def create_vlans(self, vlans: list[Vlan]) -> list[str]:
        self.created += [v.name for v in vlans]
        self.names |= {v.name for v in vlans}
        return [v.name for v in vlans]

    def remove_links(self, names: list[str]) -> None:
        self.removed += names
        self.names -= set(names)

    def vlans_supported(self) -> tuple[bool, str]:
        return self.vlan_support


@dataclass
class FakeCt:
    fail: bool = False
    calls: list[set[str]] = field(default_factory=list)

    def teardown_flows_via(self, devices: set[str]) -> Report:
        self.calls.append(devices)
        if self.fail:
            raise KernelError("conntrack delete", "boom", errno.EIO)
        return Report()


@dataclass
class FakeLock:
    events: list[str]

    def __enter__(self) -> FakeLock:
        self.events.append("lock")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.events.append("unlock")


def _ports(fake: FakeNft, rtnl: FakeRtnl | None = None, ct: FakeCt | None = None) -> Any:
    events: list[str] = []
    ports = Ports(
        nft=fake,
        rtnl=rtnl or FakeRtnl(),
        ct=ct or FakeCt(),
        lock=lambda: FakeLock(events),
        facts=lambda cfg: Facts(),
    )
    return ports, events


def cfg(devices: list[str] | None = None, vlans: bool = False) -> Config:
    data: dict[str, Any] = {"version": 1, "nat": {"masquerade": [{"oifname": "wan0"}]}}
    if devices is not None:
        data["flowtables"] = [{"name": "ft", "devices": devices}]
        data["policies"] = [{"name": "p", "flowtable": "ft"}]
    if vlans:
        data["vlans"] = [{"name": "wan0.7", "parent": "wan0", "id": 7}]
    return parse_config(data)


def test_apply_then_reapply_sends_nothing() -> None:
    fake = FakeNft()
    ports, events = _ports(fake)
    svc = RulesetService(ports)
    assert svc.apply(cfg()).committed
    assert svc.apply(cfg()).plan.empty and fake.runs == 1
    assert events == ["lock", "unlock", "lock", "unlock"]


def test_commit_happens_inside_the_lock() -> None:
    fake = FakeNft()
    ports, events = _ports(fake)
    fake.before_run.append(lambda: events.append("commit"))
    RulesetService(ports).apply(cfg())
    assert events == ["lock", "commit", "unlock"]


def test_foreign_table_is_never_written() -> None:
    fake = FakeNft()
    # chains but no rules and no marker: someone else's table
    fake.table = FakeTable(chains={"c": FakeChain(2, None)})
    ports, _ = _ports(fake)
    svc = RulesetService(ports)
    with pytest.raises(EnvironmentProblem, match="not ours"):
        svc.apply(cfg())
    with pytest.raises(EnvironmentProblem, match="not ours"):
        svc.flush(cfg())
    with pytest.raises(EnvironmentProblem, match="not ours"):
        svc.plan(cfg())
    assert fake.runs == 0 and fake.table.chains["c"].rules == []


def test_table_of_tagged_rules_without_marker_is_not_adopted() -> None:
    # Adoption of the pre-marker schema ended: cp: tags are comments anyone can type.
    fake = FakeNft()
    legacy = 'oifname "wan0" masquerade comment "cp:0123456789ab masquerade wan0"'
    srcnat = FakeChain(2, ("nat", "postrouting", 100, "accept"), [FakeRule(3, legacy)])
    fake.table = FakeTable(chains={"srcnat": srcnat})
    ports, _ = _ports(fake)
    svc = RulesetService(ports)
    for verb in (svc.apply, svc.flush, svc.plan):
        with pytest.raises(EnvironmentProblem, match="not ours"):
            verb(cfg())
    assert fake.runs == 0 and fake.table.chains["srcnat"].rules[0].text == legacy


def test_marker_with_foreign_objects_is_ours_and_restored() -> None:
    fake = FakeNft()
    ports, _ = _ports(fake)
    svc = RulesetService(ports)
    svc.apply(cfg())
    fake.hand_add_set("extra")
    assert svc.apply(cfg()).committed
    assert fake.table is not None and not fake.table.sets


def test_vlans_created_are_removed_when_the_kernel_refuses() -> None:
    fake = FakeNft()
    rtnl = FakeRtnl()
    ports, _ = _ports(fake, rtnl)

    def refuse() -> None:
        raise KernelError("nft transaction", "no", errno.EINVAL)

    fake.before_run.append(refuse)
    with pytest.raises(KernelError):
        RulesetService(ports).apply(cfg(vlans=True))
    assert rtnl.created == ["wan0.7"] and rtnl.removed == ["wan0.7"]
    assert fake.table is None


def test_teardown_failure_after_commit_is_not_exit_5() -> None:
    fake = FakeNft()
    ct = FakeCt(fail=True)
    ports, _ = _ports(fake, ct=ct)
    svc = RulesetService(ports)
    svc.apply(cfg(["a", "b"]))
    with pytest.raises(AfterCommitError) as info:
        svc.apply(cfg(["a"]))
    assert info.value.exit_code == 6 and "committed" in str(info.value)
    assert ct.calls == [{"b"}]
    assert fake.table is not None and fake.table.flowtables["ft"].devices == {"a"}


def test_teardown_of_leaving_devices_after_commit() -> None:
    fake = FakeNft()
    ct = FakeCt()
    ports, _ = _ports(fake, ct=ct)
    svc = RulesetService(ports)
    svc.apply(cfg(["a", "b"]))
    assert ct.calls == []
    res = svc.apply(cfg(["a"]))
    assert ct.calls == [{"b"}] and res.teardown is not None


def test_plan_runs_the_same_preflight_as_apply() -> None:
    fake = FakeNft(flowtables=False)
    ports, _ = _ports(fake)
    svc = RulesetService(ports)
    with pytest.raises(UnsupportedError) as info:
        svc.plan(cfg(["a"]))
    assert info.value.exit_code == 3
    with pytest.raises(EnvironmentProblem, match="nosuch0"):
        RulesetService(_ports(FakeNft())[0]).plan(cfg(["nosuch0"]))


def _once(fake: FakeNft, action: Any) -> None:
    fake.before_run.clear()
    action()


def test_concurrent_writer_makes_the_commit_fail() -> None:
    fake = FakeNft()
    ports, _ = _ports(fake)
    svc = RulesetService(ports)
    svc.apply(cfg(["a"]))
    other = RulesetService(_ports(fake)[0])
    # another writer commits between our listing and our commit
    fake.before_run.append(lambda: _once(fake, lambda: other.apply(cfg(["b"]))))
    with pytest.raises(ConcurrentChange):
        svc.apply(cfg(["a", "b"]))
    assert fake.table is not None and fake.table.flowtables["ft"].devices == {"b"}


def test_bad_bridge_port_name_from_the_kernel_never_reaches_nft() -> None:
    fake = FakeNft()
    ports, _ = _ports(fake)
    ports.facts = lambda c: Facts(bridge_ports={"br0": ("ok0", 'x"; flush ruleset')})
    with pytest.raises(EnvironmentProblem, match="br0"):
        RulesetService(ports).apply(cfg(["a"]))
    assert fake.runs == 0


@dataclass
class MemoryStamp:
    value: str | None = None

    def read(self) -> str | None:
        return self.value

    def write(self, value: str) -> None:
        self.value = value


def test_unchanged_generation_skips_the_listing_and_a_change_does_not() -> None:
    fake = FakeNft()
    ports, _ = _ports(fake)
    ports.generation = lambda: fake.generation
    ports.stamps = MemoryStamp()
    svc = RulesetService(ports)
    svc.apply(cfg())
    assert svc.apply(cfg()).plan.empty  # lists the table, verifies, stamps
    lists = fake.lists
    assert svc.apply(cfg()).plan.empty
    assert fake.lists == lists  # generation unchanged: no listing needed
    fake.hand_add_set("extra")
    assert svc.apply(cfg()).committed  # the hand edit bumped the generation
    assert fake.table is not None and not fake.table.sets
    assert not svc.apply(cfg(["a"])).plan.empty  # another config: another digest


def test_digest_only_when_the_stamp_is_of_this_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh or changed namespace cannot match a stamp of another generation:
    # the desired table's digest is not worth computing there.
    from controlplane.service import ruleset

    digests: list[str] = []
    real = ruleset._digest

    def counted(rs: nft.Ruleset) -> str:
        digests.append(real(rs))
        return digests[-1]

    monkeypatch.setattr(ruleset, "_digest", counted)
    fake = FakeNft()
    ports, _ = _ports(fake)
    ports.generation = lambda: fake.generation
    ports.stamps = MemoryStamp()
    svc = RulesetService(ports)
    assert svc.apply(cfg()).committed
    assert digests == []  # fresh: no stamp to compare with, nothing stamped
    assert svc.apply(cfg()).plan.empty
    assert len(digests) == 1  # listed and verified: stamped
    assert svc.apply(cfg()).plan.empty
    assert len(digests) == 2  # the stamp is of this generation: compared
    fake.hand_add_set("extra")
    assert svc.apply(cfg()).committed
    assert len(digests) == 2  # the generation moved on: listed, not digested


def test_apply_pauses_the_garbage_collector_and_restores_it() -> None:
    import gc

    fake = FakeNft()
    ports, _ = _ports(fake)
    collecting: list[bool] = []
    fake.before_run.append(lambda: collecting.append(gc.isenabled()))
    assert gc.isenabled()
    RulesetService(ports).apply(cfg(["a"]))
    assert collecting == [False] and gc.isenabled()

    def refuse() -> None:
        raise KernelError("nft transaction", "refused", errno.EINVAL)

    fake.before_run.append(refuse)
    with pytest.raises(KernelError):
        RulesetService(ports).apply(cfg(["a", "b"]))
    assert gc.isenabled()  # back on after a refused commit too
    gc.disable()
    try:
        fake.before_run.clear()
        RulesetService(ports).apply(cfg(["b"]))
        assert not gc.isenabled()  # off before (the CLI): left off
    finally:
        gc.enable()


def test_two_writers_that_found_no_table_cannot_both_build_one() -> None:
    fake = FakeNft()
    other = RulesetService(_ports(fake)[0])
    fake.before_run.append(lambda: _once(fake, lambda: other.apply(cfg(["b"]))))
    with pytest.raises(ConcurrentChange):
        RulesetService(_ports(fake)[0]).apply(cfg(["a"]))
    assert fake.table is not None and fake.table.flowtables["ft"].devices == {"b"}


def test_apply_path_does_not_import_pyroute2() -> None:
    # Start-up time: pyroute2 costs ~170 ms to import. An apply without
    # flowtables or VLANs reads link names through the lean codec only.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import controlplane.cli.ruleset_cmds, controlplane.service\n"
        "from controlplane.kernel.rtnl.facts import gather_facts\n"
        "from controlplane.kernel.rtnl.vlans import RtnlLinks\n"
        "from controlplane.loader import parse_config\n"
        "cfg = parse_config({'version': 1, 'nat': {'masquerade': [{'oifname': 'wan0'}]}})\n"
        "gather_facts(cfg, None)\n"
        "RtnlLinks(None).links([])\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyroute2')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout == "[]\n", res.stdout


def test_device_changes_plan_against_the_remembered_table_until_another_commit() -> None:
    fake = FakeNft()
    ct = FakeCt()
    ports, _ = _ports(fake, ct=ct)
    ports.generation = lambda: fake.generation
    svc = RulesetService(ports)
    svc.apply(cfg(["a"]))  # creates the table: not a device-only change, nothing remembered
    assert svc.apply(cfg(["a", "b"])).listed  # lists; a device-only commit is remembered
    lists = fake.lists
    res = svc.apply(cfg(["b"]))  # a port leaves
    assert not res.listed and fake.lists == lists
    assert fake.table is not None and fake.table.flowtables["ft"].devices == {"b"}
    assert ct.calls[-1] == {"a"}  # its flows are torn down as after a listing
    assert not svc.apply(cfg(["a", "b"])).listed  # a port joins
    assert fake.table.flowtables["ft"].devices == {"a", "b"}
    assert svc.apply(cfg(["a", "b"])).plan.empty and fake.lists == lists  # nothing sent
    # a's counter came back in a commit we did not list: its handle is unknown,
    # so a's next leave (delete by handle) is planned against a listing
    res = svc.apply(cfg(["b"]))
    assert res.listed and fake.lists == lists + 1
    assert fake.table is not None and fake.table.flowtables["ft"].devices == {"b"}
    assert "classic_in_a" not in fake.table.counters
    lists = fake.lists
    assert not svc.apply(cfg(["a", "b"])).listed and fake.lists == lists
    fake.hand_add_set("extra")  # anyone's commit bumps the generation: list again
    res = svc.apply(cfg(["a"]))
    assert res.listed and fake.lists == lists + 1
    assert fake.table is not None and not fake.table.sets  # drift restored by content
    assert fake.table.flowtables["ft"].devices == {"a"}


def _remembering(fake: FakeNft) -> RulesetService:
    """A service that reads the generation and has just remembered a device-only commit."""
    ports, _ = _ports(fake)
    ports.generation = lambda: fake.generation
    svc = RulesetService(ports)
    svc.apply(cfg(["a"]))
    svc.apply(cfg(["a", "b"]))
    return svc


def test_a_commit_that_was_not_the_only_one_is_not_remembered() -> None:
    fake = FakeNft()
    svc = _remembering(fake)

    def elsewhere() -> None:  # another table's commit, between our read and our commit
        fake.generation += 1

    fake.before_run.append(lambda: _once(fake, elsewhere))
    assert not svc.apply(cfg(["b"])).listed
    assert svc.apply(cfg(["a", "b"])).listed  # generation moved by 2: unproven, listed


def test_another_writer_after_our_generation_read_loses_to_the_serial() -> None:
    fake = FakeNft()
    svc = _remembering(fake)
    other = RulesetService(_ports(fake)[0])
    # Races the remembered plan: it commits after our generation read.
    fake.before_run.append(lambda: _once(fake, lambda: other.apply(cfg(["a"]))))
    with pytest.raises(ConcurrentChange):
        svc.apply(cfg(["b"]))
    assert fake.table is not None and fake.table.flowtables["ft"].devices == {"a"}
    res = svc.apply(cfg(["b"]))
    assert res.listed and fake.table.flowtables["ft"].devices == {"b"}


def test_only_device_and_serial_changes_are_derived_without_a_listing() -> None:
    from controlplane.core.plan import Observed, ObservedFlowtable, Plan
    from controlplane.service.ruleset import _follows, after_device_change

    obs = Observed(flowtables={"ft": ObservedFlowtable("ft", 0, frozenset({"a"}), handle=4)})
    obs = replace_serial(obs, 7)
    ft = nft.Flowtable("ft", 0, ("b",))
    joined = Plan(REF, (nft.SwapSerial(7, 8), nft.AddFlowtable(ft)), ())
    after = after_device_change(obs, joined)
    assert after is not None and after.serial == 8
    assert after.flowtables["ft"].devices == {"a", "b"} and after.flowtables["ft"].handle == 4
    left = Plan(REF, (nft.SwapSerial(8, 9), nft.DeleteFlowtableDevices("ft", ("a",))), ())
    again = after_device_change(after, left)
    assert again is not None and again.flowtables["ft"].devices == {"b"}
    assert after_device_change(obs, Plan(REF, (nft.SwapSerial(6, 8),), ())) is None  # not ours
    redefined = nft.AddFlowtable(nft.Flowtable("ft", 5, ("b",)))
    assert after_device_change(obs, Plan(REF, (nft.SwapSerial(7, 8), redefined), ())) is None
    counted = after_device_change(obs, Plan(REF, (nft.AddCounter("c"),), ()))
    assert counted is not None and counted.counters == {"c": 0}  # handle unknown
    assert after_device_change(obs, Plan(REF, (nft.DeleteChain("forward"),), ())) is None
    assert _follows(3, 4) and not _follows(3, 5)
    assert _follows("9:41", "9:42") and not _follows("9:41", "8:42")
    assert _follows("9:4294967295", "9:1")  # the kernel skips 0 on wrap


def replace_serial(obs: Any, serial: int) -> Any:
    from dataclasses import replace

    return replace(obs, serial=serial)

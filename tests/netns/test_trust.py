"""Trust boundaries against the real host kernel: injection, ownership, the lock
and compare-and-swap, drift by content, canonical rendering, exit codes.

Host kernel: no flowtables, so configs here are NAT/guard rules; rules with
``flow add`` and flowtable listings are checked in the VM.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
import yaml
from typer.testing import CliRunner

from controlplane.cli import config_cmds as _config_cmds  # noqa: F401  (registers verbs)
from controlplane.cli import ruleset_cmds as _commands  # noqa: F401  (registers verbs)
from controlplane.cli.common import app
from controlplane.core import nft
from controlplane.core.plan import make_plan
from controlplane.core.render import render
from controlplane.errors import EnvironmentProblem, KernelError
from controlplane.kernel.nft.libnft import Nft
from controlplane.loader import load_config, parse_config
from controlplane.service import RulesetService, real_ports
from controlplane.service import apply as service_apply
from controlplane.service.lock import NetnsLock
from tests.netns.conftest import sh

if TYPE_CHECKING:
    from controlplane.kernel.ports import NftPort

OFFLOADCTL = [sys.executable, "-m", "controlplane.cli"]
EXAMPLES = Path(__file__).parents[2] / "nft" / "examples"

NAT_A = {
    "version": 1,
    "nat": {
        "masquerade": [{"oifname": "wan0", "saddr": ["10.0.1.0/24"]}],
        "dnat": [{"iifname": "wan0", "port": 8080, "to": "10.0.1.2", "to_port": 80}],
    },
}
NAT_B = {
    "version": 1,
    "nat": {
        "snat": [{"oifname": "wan0", "to": "192.0.2.1"}],
        "dnat": [
            {"iifname": "lan0", "port": p, "to": "10.0.2.2", "to_port": 22}
            for p in range(2000, 2010)
        ],
    },
}

PAYLOADS = [
    "offloadctl; delete table inet mine",
    "x\ndelete table ip nat2",
    '"; flush ruleset; "',
    "t { }",
    "t # comment",
    "$var",
    "@set",
    "a b",
]


def write(tmp_path: Path, data: object, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def ruleset(ns: str) -> str:
    return sh("nft", "list", "ruleset", netns=ns)


def with_foreign_tables(ns: str) -> None:
    sh(
        "nft",
        "add table inet mine; add chain inet mine c; add set inet mine s { type ipv4_addr; };"
        " add table ip nat2; add chain ip nat2 post { type nat hook postrouting priority 100; }",
        netns=ns,
    )


def test_no_flag_value_reaches_nft(router: str, tmp_path: Path) -> None:
    with_foreign_tables(router)
    cfg = write(tmp_path, NAT_A)
    runner = CliRunner()
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    before = ruleset(router)
    assert "table inet mine" in before and "table ip nat2" in before
    for bad in PAYLOADS:
        badfile = tmp_path / "x.yaml"
        badfile.write_text(yaml.safe_dump({"version": 1, "table": {"name": bad}}))
        cases = [
            ["show", "--netns", router, "--table", bad],
            ["show", "--netns", router, "--table", bad, "--json"],
            ["status", "--netns", router, "--table", bad],
            ["status", "--netns", router, "--config", str(badfile)],
            ["flows", "--netns", router, "--table", bad],
            ["flows", "--netns", router, "--dev", bad],
            ["explain", "--dev", bad, "--netns", router],
            ["explain", "--id", "1", "--netns", bad],
            ["plan", str(badfile), "--netns", router],
            ["apply", str(badfile), "--netns", router],
            ["apply", str(badfile), "--netns", router, "--check"],
            ["flush", str(badfile), "--netns", router],
            ["render", str(badfile), "--netns", router],
            ["plan", str(cfg), "--netns", bad],
            ["apply", str(cfg), "--netns", bad],
            ["flush", str(cfg), "--netns", bad],
            ["show", "--netns", bad],
            ["status", "--netns", bad],
            ["probe", "--netns", bad],
            ["apply", bad, "--netns", router],
        ]
        for args in cases:
            res = runner.invoke(app, args)
            assert res.exit_code in (2, 4), (args, res.exit_code, res.output)
            assert "No such command" not in res.output
            assert ruleset(router) == before, args


def test_show_and_status_exit_codes(router: str, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["show", "--netns", router])
    assert res.exit_code == 4 and "does not exist" in res.output
    assert runner.invoke(app, ["show", "--netns", router, "--table", "a;b"]).exit_code == 2
    res = runner.invoke(app, ["status", "--netns", router])
    assert res.exit_code == 0 and "absent" in res.output


@pytest.mark.parametrize(
    "script",
    [
        "add table inet offloadctl; add chain inet offloadctl c",
        "add table inet offloadctl; add set inet offloadctl s { type ipv4_addr; }",
        "add table inet offloadctl",
        'add table inet offloadctl { comment "mine"; }; add chain inet offloadctl c;'
        ' add rule inet offloadctl c accept comment "cp:000000000000 x"',
    ],
)
def test_foreign_table_is_never_touched(router: str, tmp_path: Path, script: str) -> None:
    sh("nft", script, netns=router)
    before = ruleset(router)
    runner = CliRunner()
    cfg = write(tmp_path, NAT_A)
    for verb in ("plan", "apply", "flush"):
        res = runner.invoke(app, [verb, str(cfg), "--netns", router])
        assert res.exit_code == 4 and "not ours" in res.output, (verb, res.output)
    assert ruleset(router) == before


def test_our_marker_is_set_and_pre_marker_tables_are_not_adopted(
    router: str, tmp_path: Path
) -> None:
    # A table as offloadctl 0.1.0 wrote it (every rule tagged, no marker): adopting it
    # let anyone's table of typed cp: comments be deleted; that ended (ownership.py).
    rs = render(parse_config(NAT_A))
    legacy = "".join(
        op.text(rs.ref) + "\n"
        for op in nft.create_ops(rs)
        if not isinstance(op, nft.CreateTable | nft.AddSerial)
    )
    sh("nft", f"add table inet offloadctl\n{legacy}", netns=router)
    before = ruleset(router)
    cfg = write(tmp_path, NAT_A)
    runner = CliRunner()
    for verb in ("plan", "apply", "flush"):
        res = runner.invoke(app, [verb, str(cfg), "--netns", router])
        assert res.exit_code == 4 and "not ours" in res.output, (verb, res.output)
    assert ruleset(router) == before
    sh("nft", "delete table inet offloadctl", netns=router)
    assert service_apply(parse_config(NAT_A), router).committed
    head = sh("nft", "list", "table", "inet", "offloadctl", netns=router).splitlines()[1]
    assert head.strip() == f'comment "{nft.TABLE_MARKER}"'
    assert service_apply(parse_config(NAT_A), router).plan.empty


# F1/F2 (issue 15): comments that resemble the marker; each was taken as ours, or
# crashed int() (exit 70).
LOOKALIKE_SCHEMAS = ["01", "\u0661", "0" * 90 + "1", "\u00b9", "\u00b2", "1 ", "+1"]


@pytest.mark.parametrize("schema", LOOKALIKE_SCHEMAS)
def test_a_marker_not_exactly_ours_is_not_ours(router: str, tmp_path: Path, schema: str) -> None:
    comment = f"{nft.MARKER_PREFIX}{schema}"
    sh("nft", f'add table inet offloadctl {{ comment "{comment}"; }}', netns=router)
    before = ruleset(router)
    cfg = write(tmp_path, NAT_A)
    runner = CliRunner()
    for args in (
        ["plan", str(cfg), "--netns", router],
        ["apply", str(cfg), "--netns", router],
        ["flush", str(cfg), "--netns", router],
        ["status", "--netns", router, "--config", str(cfg)],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 4 and "not ours" in res.output, (args, res.output)
    res = runner.invoke(app, ["status", "--netns", router])
    assert res.exit_code == 0 and "(foreign)" in res.output, res.output
    assert ruleset(router) == before


def test_drift_is_detected_by_content_and_restored(router: str, tmp_path: Path) -> None:
    cfg = write(tmp_path, NAT_A)
    runner = CliRunner()
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    clean = sh("nft", "-a", "list", "table", "inet", "offloadctl", netns=router)
    listing = sh("nft", "-a", "list", "chain", "inet", "offloadctl", "dstnat", netns=router)
    line = next(ln for ln in listing.splitlines() if "dnat ip to" in ln)
    handle = line.rsplit("# handle ", 1)[1]
    comment = line.split('comment "')[1].split('"')[0]
    # content changed by hand, tag kept; a hand-added chain reached by a jump; a set
    sh(
        "nft",
        f'replace rule inet offloadctl dstnat handle {handle} iifname "wan0" tcp dport 8080'
        f' dnat ip to 10.9.9.9:80 comment "{comment}";'
        " add chain inet offloadctl extra; add rule inet offloadctl extra counter;"
        " add rule inet offloadctl srcnat jump extra;"
        " add set inet offloadctl hand { type ipv4_addr; }",
        netns=router,
    )
    res = runner.invoke(app, ["plan", str(cfg), "--netns", router])
    assert res.exit_code == 1
    assert "changed by hand" in res.output and "chain extra" in res.output
    assert "set hand" in res.output and "jump extra" in res.output
    res = runner.invoke(app, ["status", "--netns", router, "--config", str(cfg)])
    assert res.exit_code == 1 and "drift: rule cp:" in res.output  # a script can test it
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    now = sh("nft", "list", "table", "inet", "offloadctl", netns=router)
    assert "10.9.9.9" not in now and "extra" not in now and "set hand" not in now
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    before = sh("nft", "-a", "list", "table", "inet", "offloadctl", netns=router)
    res = runner.invoke(app, ["apply", str(cfg), "--netns", router])
    assert "no changes" in res.output  # nothing sent: same handles
    assert sh("nft", "-a", "list", "table", "inet", "offloadctl", netns=router) == before
    assert before.count("chain ") == clean.count("chain ")


def test_every_example_renders_as_nft_lists_it(router: str) -> None:
    for example in sorted(EXAMPLES.glob("*.yaml")):
        rs = render(load_config(example))
        # the host has no flowtables: keep the rules it can take (VM: all of them)
        kept = tuple(r for r in rs.rules if r.flowtable_ref is None)
        host_rs = replace(rs, flowtables=(), rules=kept)
        ctx = Nft(router)
        ctx.run(make_plan(host_rs, None).transaction)
        observed = ctx.list_table(host_rs.ref)
        assert observed is not None
        for chain in host_rs.chains:
            listed = [r.text for r in observed.rules_of(chain.name)]
            assert listed == [r.listed for r in host_rs.rules_of(chain.name)], example.name
        assert make_plan(host_rs, observed).empty, example.name
        sh("nft", "delete table inet offloadctl", netns=router)


def test_stale_transaction_is_refused_by_the_kernel(router: str) -> None:
    ctx = Nft(router)
    a, b = render(parse_config(NAT_A)), render(parse_config(NAT_B))
    ctx.run(make_plan(a, None).transaction)
    stale = make_plan(b, ctx.list_table(a.ref))
    ctx.run(make_plan(b, ctx.list_table(a.ref)).transaction)  # another writer commits
    before = ruleset(router)
    with pytest.raises(KernelError) as info:
        ctx.run(stale.transaction)  # planned against serial 1, the table is at 2
    assert info.value.errno == 2
    assert ruleset(router) == before


def test_two_names_for_one_netns_share_the_lock(router: str) -> None:
    alias = f"{router}-alias"
    Path(f"/run/netns/{alias}").touch()
    sh("mount", "--bind", f"/run/netns/{router}", f"/run/netns/{alias}")
    try:
        assert NetnsLock(router).path == NetnsLock(alias).path
        with NetnsLock(router), pytest.raises(EnvironmentProblem):
            NetnsLock(alias, wait=0.2).__enter__()
    finally:
        sh("umount", f"/run/netns/{alias}")
        Path(f"/run/netns/{alias}").unlink()


def test_closing_the_lock_releases_it_once(router: str) -> None:
    lock = NetnsLock(router)
    with lock, pytest.raises(EnvironmentProblem, match="another process has held"):
        NetnsLock(router, wait=0.2).open()
    with NetnsLock(router, wait=0.2) as again:  # released by leaving the block
        lock.close()  # a second close must not release (close) anyone else's descriptor
        with pytest.raises(EnvironmentProblem, match="another process has held"):
            NetnsLock(router, wait=0.2).open()
    again.close()


def _normalised(text: str) -> str:
    # the serial counts commits; everything else must equal one config's table
    return "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("elements = {"))


@pytest.mark.timeout(900)  # 100 CLI runs: ~2 min on a busy 2-core machine
def test_concurrent_applies_serialise(make_netns: Callable[[], str], tmp_path: Path) -> None:
    ns = make_netns()
    sh("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "lan0", netns=ns)
    ca, cb = write(tmp_path, NAT_A, "a.yaml"), write(tmp_path, NAT_B, "b.yaml")
    expected = {}
    for name, cfg in (("a", ca), ("b", cb)):
        subprocess.run([*OFFLOADCTL, "apply", str(cfg), "--netns", ns], check=True)
        expected[name] = _normalised(sh("nft", "list", "table", "inet", "offloadctl", netns=ns))
        sh("nft", "delete table inet offloadctl", netns=ns)
    assert expected["a"] != expected["b"]

    for _ in range(50):
        procs = [
            subprocess.Popen(
                [*OFFLOADCTL, "apply", str(cfg), "--netns", ns],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for cfg in (ca, cb)
        ]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, (out, err)
        table = _normalised(sh("nft", "list", "table", "inet", "offloadctl", netns=ns))
        assert table in (expected["a"], expected["b"])
        sh("nft", "delete table inet offloadctl", netns=ns)


def test_two_creations_from_an_absent_table_cannot_both_commit(router: str) -> None:
    ctx = Nft(router)
    a, b = render(parse_config(NAT_A)), render(parse_config(NAT_B))
    plan_a, plan_b = make_plan(a, None), make_plan(b, None)  # both saw no table
    ctx.run(plan_a.transaction)
    before = ruleset(router)
    with pytest.raises(KernelError) as info:
        ctx.run(plan_b.transaction)
    assert info.value.errno == 17  # EEXIST: the serial set exists already
    assert ruleset(router) == before


def test_a_table_made_by_hand_mid_apply_is_never_written(router: str) -> None:
    """F3: the table appears between our listing (absent) and our commit. Made
    deterministic by creating it from inside the commit call, just before the
    batch is sent: an unconditional ``add table`` would fill it."""
    ports = real_ports(router)

    class HandMadeFirst:
        def __init__(self, inner: NftPort) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def run(self, txn: nft.Transaction, check: bool = False) -> None:
            if not check:
                sh("nft", "add table inet offloadctl", netns=router)
            self.inner.run(txn, check)

    svc = RulesetService(replace(ports, nft=cast("NftPort", HandMadeFirst(ports.nft))))
    with pytest.raises(KernelError) as info:
        svc.apply(parse_config(NAT_A))
    assert info.value.exit_code == 5
    listing = sh("nft", "list", "table", "inet", "offloadctl", netns=router)
    assert listing.split() == ["table", "inet", "offloadctl", "{", "}"], listing
    # ... and it stays the owner's: every verb leaves it alone.
    res = CliRunner().invoke(app, ["status", "--netns", router])
    assert res.exit_code == 0 and "(foreign)" in res.output


# F4: hand-added objects of every kind nft puts in a table, and references to them.
HAND_ADDED = {
    "map": "add map inet offloadctl hm { type ipv4_addr : ipv4_addr; }",
    "map+vmap": "add map inet offloadctl vm { type ipv4_addr : verdict; };"
    " add chain inet offloadctl hc; add element inet offloadctl vm { 192.0.2.9 : jump hc };"
    " add rule inet offloadctl srcnat ip saddr vmap @vm",
    "ct helper": 'add ct helper inet offloadctl h { type "ftp" protocol tcp; }',
    "ct timeout": "add ct timeout inet offloadctl to"
    " { protocol tcp; l3proto ip; policy = { established: 100 }; }",
    "ct expectation": "add ct expectation inet offloadctl e"
    " { protocol tcp; dport 21; timeout 1s; size 10; l3proto ip; }",
    "set, counter, quota, limit, synproxy, objref map": (
        "add set inet offloadctl s { type ipv4_addr; elements = { 192.0.2.1 }; };"
        " add counter inet offloadctl cn; add quota inet offloadctl q { 100 bytes };"
        " add limit inet offloadctl l { rate 10/second };"
        " add synproxy inet offloadctl sp { mss 1460; wscale 7; };"
        " add map inet offloadctl cm { type ipv4_addr : counter; };"
        ' add element inet offloadctl cm { 192.0.2.2 : "cn" };'
        " add rule inet offloadctl srcnat ip saddr @s counter name cn;"
        " add rule inet offloadctl dstnat quota name q"
    ),
    # a name nft takes but offloadctl never puts into a command: the table is rebuilt
    "chain x.y": "add chain inet offloadctl x.y; add rule inet offloadctl x.y counter;"
    " add rule inet offloadctl srcnat jump x.y",
}


@pytest.mark.parametrize("case", list(HAND_ADDED))
def test_every_hand_added_object_is_removed(router: str, tmp_path: Path, case: str) -> None:
    cfg = write(tmp_path, NAT_A)
    runner = CliRunner()
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    clean = sh("nft", "list", "table", "inet", "offloadctl", netns=router)
    sh("nft", HAND_ADDED[case], netns=router)
    res = runner.invoke(app, ["plan", str(cfg), "--netns", router])
    assert res.exit_code == 1, res.output
    assert ("rebuilt" in res.output) == (case == "chain x.y"), res.output
    res = runner.invoke(app, ["apply", str(cfg), "--netns", router])
    assert res.exit_code == 0, res.output
    assert _normalised(sh("nft", "list", "table", "inet", "offloadctl", netns=router)) == (
        _normalised(clean)
    )
    res = runner.invoke(app, ["plan", str(cfg), "--netns", router])
    assert res.exit_code == 0, res.output


def test_a_dormant_table_is_drift_and_apply_clears_it(router: str, tmp_path: Path) -> None:
    """F5: ``flags dormant`` switches every hook off; it is not the declared state."""
    cfg = write(tmp_path, NAT_A)
    runner = CliRunner()
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    sh("nft", "add table inet offloadctl { flags dormant; }", netns=router)
    res = runner.invoke(app, ["plan", str(cfg), "--netns", router])
    assert res.exit_code == 1 and "dormant" in res.output, res.output
    res = runner.invoke(app, ["status", "--netns", router, "--config", str(cfg)])
    assert "drift: table flags dormant" in res.output, res.output
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    assert "dormant" not in sh("nft", "list", "table", "inet", "offloadctl", netns=router)
    assert runner.invoke(app, ["plan", str(cfg), "--netns", router]).exit_code == 0


def _ssh_in(dport: list[int | str]) -> dict[str, object]:
    accept = [{"name": "in", "protocols": ["tcp"], "dport": dport}]
    return {"version": 1, "forward": {"policy": "drop", "accept": accept}}


@pytest.mark.parametrize("dport", [[22, 22], [22, "20-30"], ["20-30", 31], [22, 23, "30-40"]])
def test_ports_nft_would_merge_are_config_errors(
    router: str, tmp_path: Path, dport: list[int | str]
) -> None:
    """F6: nft stores them merged, so every plan would report false drift."""
    cfg = write(tmp_path, _ssh_in(dport))
    before = ruleset(router)
    runner = CliRunner()
    for args in (["validate", str(cfg)], ["apply", str(cfg), "--netns", router]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "forward.accept[0].dport[" in res.output and "(line " in res.output
    assert ruleset(router) == before


@pytest.mark.parametrize("dport", [[22, 23, 24], [22, 24, "100-200", "300-400"]])
def test_ports_nft_keeps_apart_plan_no_drift(
    router: str, tmp_path: Path, dport: list[int | str]
) -> None:
    cfg = write(tmp_path, _ssh_in(dport))
    runner = CliRunner()
    assert runner.invoke(app, ["apply", str(cfg), "--netns", router]).exit_code == 0
    res = runner.invoke(app, ["plan", str(cfg), "--netns", router])
    assert res.exit_code == 0, res.output


def test_render_in_a_missing_namespace_is_exit_4(tmp_path: Path) -> None:
    cfg = write(tmp_path, {"version": 1})
    res = CliRunner().invoke(app, ["render", str(cfg), "--netns", "offloadctl-harden-absent"])
    assert res.exit_code == 4 and "does not exist" in res.output, res.output

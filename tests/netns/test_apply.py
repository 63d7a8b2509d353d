"""apply / plan / show / flush / probe against the real host kernel, one namespace per test.

The host kernel has no flowtables, so rules here are those it supports (NAT,
the guard); flowtable apply is proven in vm-tests/. The refusal path for
flowtables is proven here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from controlplane.core import nft
from controlplane.core.plan import make_plan
from controlplane.core.render import render
from controlplane.errors import KernelError
from controlplane.kernel.nft.libnft import Nft
from controlplane.loader import parse_config
from controlplane.service import ruleset as ruleset_service
from tests.netns.conftest import sh

OFFLOADCTL = [sys.executable, "-m", "controlplane.cli"]

NAT = {
    "version": 1,
    "nat": {
        "masquerade": [{"oifname": "wan0", "saddr": ["10.0.1.0/24"]}],
        "dnat": [{"iifname": "wan0", "port": 8080, "to": "10.0.1.2", "to_port": 80}],
    },
}


def run(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*OFFLOADCTL, *args], capture_output=True, text=True, check=False)
    if check_rc is not None:
        assert res.returncode == check_rc, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    return res


@pytest.fixture
def router(netns: str) -> str:
    sh("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "lan0", netns=netns)
    return netns


def write(tmp_path: Path, data: dict[str, object], name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def ruleset(ns: str) -> str:
    return sh("nft", "list", "ruleset", netns=ns)


def test_apply_plan_idempotent(router: str, tmp_path: Path) -> None:
    cfg = write(tmp_path, NAT)
    assert run("plan", str(cfg), "--netns", router, check_rc=1).stdout.startswith("+ table")
    out = run("apply", str(cfg), "--netns", router).stdout
    assert "applied in" in out
    listed = ruleset(router)
    assert "masquerade" in listed and "dnat ip to 10.0.1.2:80" in listed
    assert "tcp flags != syn / fin,syn,rst,ack" in listed  # the NAT guard
    # unchanged config: plan exits 0 and apply touches nothing (same handles)
    before = sh("nft", "-a", "list", "table", "inet", "offloadctl", netns=router)
    assert "no changes" in run("plan", str(cfg), "--netns", router).stdout
    assert "no changes" in run("apply", str(cfg), "--netns", router).stdout
    assert sh("nft", "-a", "list", "table", "inet", "offloadctl", netns=router) == before
    show = run("show", "--netns", router).stdout
    assert "table inet offloadctl" in show


def test_changing_one_chain_leaves_the_others(router: str, tmp_path: Path) -> None:
    run("apply", str(write(tmp_path, NAT)), "--netns", router)
    before = sh("nft", "-a", "list", "chain", "inet", "offloadctl", "srcnat", netns=router)
    changed = json.loads(json.dumps(NAT))
    changed["nat"]["dnat"].append({"iifname": "wan0", "port": 8443, "to": "10.0.1.3"})
    res = run("plan", str(write(tmp_path, changed)), "--netns", router, check_rc=1)
    assert "~ chain dstnat" in res.stdout and "srcnat" not in res.stdout
    run("apply", str(write(tmp_path, changed)), "--netns", router)
    assert sh("nft", "-a", "list", "chain", "inet", "offloadctl", "srcnat", netns=router) == before
    assert "dnat ip to 10.0.1.3" in ruleset(router)


def test_failing_rule_rolls_back_everything(router: str, tmp_path: Path) -> None:
    run("apply", str(write(tmp_path, NAT)), "--netns", router)
    before = ruleset(router)
    # A transaction whose last operation the kernel refuses (masquerade in a
    # filter chain): nothing of it may remain.
    desired = render(parse_config({**NAT, "nat": {**NAT["nat"], "dnat": []}}))  # type: ignore[dict-item]
    bad = nft.Rule("input", (nft.masquerade(),), "broken on purpose")
    desired = nft.Ruleset(
        desired.family,
        desired.table,
        desired.flowtables,
        desired.counters,
        desired.chains,
        (*desired.rules, bad),
    )
    ctx = Nft(router)
    observed = ctx.list_table(desired.ref)
    assert observed is not None
    plan = make_plan(desired, observed)
    with pytest.raises(KernelError) as info:
        ctx.run(plan.transaction)
    assert info.value.errno is not None
    assert ruleset(router) == before


def test_kernel_rejection_via_cli_keeps_previous_state(router: str, tmp_path: Path) -> None:
    run("apply", str(write(tmp_path, NAT)), "--netns", router)
    before = ruleset(router)
    # valid config, but the device does not exist in this namespace
    missing = {"version": 1, "flowtables": [{"name": "ft", "devices": ["nosuch0"]}]}
    res = run("apply", str(write(tmp_path, missing)), "--netns", router, check_rc=4)
    assert "nosuch0" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert ruleset(router) == before


def test_other_tables_untouched(router: str, tmp_path: Path) -> None:
    sh(
        "nft",
        "add table inet other; add chain inet other c; add rule inet other c counter accept",
        netns=router,
    )
    sh("nft", "add table ip legacy", netns=router)
    other = sh("nft", "list", "table", "inet", "other", netns=router)
    run("apply", str(write(tmp_path, NAT)), "--netns", router)
    run("flush", str(write(tmp_path, NAT)), "--netns", router)
    assert sh("nft", "list", "table", "inet", "other", netns=router) == other
    assert "table ip legacy" in ruleset(router)
    assert "offloadctl" not in ruleset(router)


def test_refuses_a_table_it_does_not_own(router: str, tmp_path: Path) -> None:
    sh(
        "nft",
        "add table inet offloadctl; add chain inet offloadctl c; add rule inet offloadctl c accept",
        netns=router,
    )
    before = ruleset(router)
    res = run("apply", str(write(tmp_path, NAT)), "--netns", router, check_rc=4)
    assert "not ours" in res.stderr
    run("flush", str(write(tmp_path, NAT)), "--netns", router, check_rc=4)
    assert ruleset(router) == before


def test_netns_targeting(make_netns: Callable[[], str], tmp_path: Path) -> None:
    a, b = make_netns(), make_netns()
    for ns in (a, b):
        sh("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "lan0", netns=ns)
    run("apply", str(write(tmp_path, NAT)), "--netns", a)
    assert "offloadctl" in ruleset(a)
    assert "offloadctl" not in ruleset(b)
    res = run("apply", str(write(tmp_path, NAT)), "--netns", "cpt-does-not-exist", check_rc=4)
    assert "does not exist" in res.stderr


def test_check_mode_commits_nothing(router: str, tmp_path: Path) -> None:
    res = run("apply", str(write(tmp_path, NAT)), "--netns", router, "--check")
    assert "check passed" in res.stdout
    assert "offloadctl" not in ruleset(router)


def test_flowtables_refused_with_reason(router: str, tmp_path: Path) -> None:
    cfg = {
        "version": 1,
        "flowtables": [{"name": "ft", "devices": ["wan0", "lan0"]}],
        "policies": [{"name": "p", "flowtable": "ft"}],
    }
    res = run("apply", str(write(tmp_path, cfg)), "--netns", router, check_rc=3)
    assert "NF_FLOW_TABLE" in res.stderr
    assert "offloadctl" not in ruleset(router)
    probe = json.loads(run("probe", "--netns", router, "--json", check_rc=3).stdout)
    by_name = {c["name"]: c for c in probe}
    assert by_name["flowtables"]["ok"] is False
    assert by_name["conntrack"]["ok"] is True
    assert by_name["reuseport-migration"]["ok"] is True


def test_bad_input_is_one_line_and_changes_nothing(router: str, tmp_path: Path) -> None:
    bad = write(tmp_path, {"version": 1, "flowtables": [{"name": "ft", "devices": ["x" * 20]}]})
    res = run("apply", str(bad), "--netns", router, check_rc=2)
    assert "flowtables[0].devices[0] (line" in res.stderr
    res = run("validate", str(tmp_path / "nope.yaml"), check_rc=2)
    assert "no such file" in res.stderr
    assert "offloadctl" not in ruleset(router)


def test_needs_root(router: str) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir="/tmp", delete=False) as f:
        yaml.safe_dump(NAT, f)
    cfg = Path(f.name)
    os.chmod(cfg, 0o644)
    res = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            *OFFLOADCTL,
            "apply",
            str(cfg),
            "--netns",
            router,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    cfg.unlink()
    assert res.returncode == 4, res.stderr
    assert "root" in res.stderr and "Traceback" not in res.stderr


def test_applier_api_reports_plan(router: str) -> None:
    res = ruleset_service.apply(parse_config(NAT), router)
    assert res.committed and not res.plan.empty
    assert ruleset_service.apply(parse_config(NAT), router).plan.empty

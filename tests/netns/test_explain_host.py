"""``offloadctl explain`` and ``status`` on the host kernel, which cannot offload
(no NF_FLOW_TABLE): a realistic "kernel cannot offload" case.

Lab of tests/netns/test_teardown.py: router R (br0 with p1 → A, p2 → B; a
masqueraded wan → S), TCP A/B → S:5000 and :5001.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml
from typer.testing import CliRunner

from controlplane.cli.common import app
from controlplane.kernel.ctnetlink.conntrack import dump_flows
from controlplane.kernel.netns import entered
from tests.netns.conftest import sh
from tests.netns.test_teardown import CLIENT, SERVER, WAN_ADDR, Lab, lab

__all__ = ["lab"]

CANNOT = "the kernel cannot offload: kernel refused 'add flowtable' with ENOENT"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def flow_id(router: str, client: str, port: int) -> int:
    return next(f.id for f in dump_flows(router) if f.orig.src == client and f.orig.dport == port)


def test_explain_a_flow_names_the_kernel_and_the_missing_table(lab: Lab) -> None:
    a = CLIENT["A"]
    sport = next(
        f.orig.sport for f in dump_flows(lab.router) if f.orig.src == a and f.orig.dport == 5000
    )
    code, out, err = run("explain", "tcp", f"{a}:{sport}", f"{SERVER}:5000", "--netns", lab.router)
    assert code == 1, err
    assert out.splitlines() == [
        f"tcp {a}:{sport} -> {SERVER}:5000 id={flow_id(lab.router, a, 5000)}:"
        " NOT on the fast path (no [OFFLOAD])",
        f"  reason (kernel): {CANNOT}: no NF_FLOW_TABLE (nf_flow_table_inet)",
        "  reason (no_table): the table is absent: nothing offloads",
        "(policies: no config)",
    ]

    # The same flow by conntrack id, as JSON.
    ct_id = flow_id(lab.router, a, 5000)
    code, out, _ = run("explain", "--id", str(ct_id), "--netns", lab.router, "--json")
    (doc,) = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["code"] for r in doc["reasons"]] == ["kernel", "no_table"]
    assert doc["offloaded"] is False and doc["fast_path"] is False
    assert doc["policies_from"] == "no config"
    # --ip: every flow with that endpoint.
    code, out, _ = run("explain", "--ip", CLIENT["B"], "--netns", lab.router, "--json")
    assert code == 1 and len(out.splitlines()) == 2


def test_explain_a_flow_of_the_router_itself(lab: Lab) -> None:
    with entered(lab.router):
        conn = socket.create_connection((SERVER, 5000), timeout=5)
    try:
        sport = conn.getsockname()[1]
        # status counts forwarded flows only: the router's own connection is not one.
        doc = json.loads(run("status", "--netns", lab.router, "--json")[1])
        assert (doc["conntrack"] >= 5, doc["forwarded_flows"]) == (True, 4), doc
        code, out, _ = run(
            "explain",
            "tcp",
            f"{WAN_ADDR}:{sport}",
            f"{SERVER}:5000",
            "--netns",
            lab.router,
            "--json",
        )
    finally:
        conn.close()
    (doc,) = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["code"] for r in doc["reasons"]] == ["not_forwarded"]
    assert doc["reasons"][0]["text"].startswith(f"{WAN_ADDR} is this router's own address")


def test_explain_a_device(lab: Lab) -> None:
    code, out, _ = run("explain", "--dev", "p1", "--netns", lab.router)
    assert code == 1
    assert out.splitlines()[:3] == [
        "p1: NOT on the fast path (no [OFFLOAD])",
        f"  reason (kernel): {CANNOT}: no NF_FLOW_TABLE (nf_flow_table_inet)",
        "  reason (no_table): the table is absent: nothing offloads",
    ]


def test_explain_errors(lab: Lab, tmp_path: Path) -> None:
    cases = [
        (["explain", "tcp", "10.9.9.9:1", "10.9.9.8:2"], 4, "no conntrack entry matches tcp"),
        (
            ["explain", "tcp", "10.0.1.2", "10.9.9.8:2"],
            2,
            "FLOW source: '10.0.1.2' is not ADDRESS:PORT",
        ),
        (["explain", "icmp", "a:1", "b:2"], 2, "expected 'tcp|udp SRC:PORT DST:PORT'"),
        (["explain", "--ip", "10.0.1.300"], 2, "--ip"),
        (["explain", "--dev", "nosuch0"], 4, "--dev: no device 'nosuch0'"),
        (["explain"], 2, "give exactly one of FLOW, --ip, --id, --dev"),
        (["explain", "--id", "1", "--dev", "p1"], 2, "give exactly one of"),
    ]
    for args, exit_code, message in cases:
        code, _, err = run(*args, "--netns", lab.router)
        assert (code, message in err) == (exit_code, True), (args, code, err)
    missing = tmp_path / "none.yaml"
    code, _, err = run("explain", "--id", "1", "--config", str(missing), "--netns", lab.router)
    assert code == 2 and "none.yaml" in err


def test_status_opens_with_the_verdict(lab: Lab, tmp_path: Path) -> None:
    code, out, err = run("status", "--netns", lab.router)
    assert code == 0, err
    assert out.splitlines()[0] == (
        "verdict: kernel CANNOT offload (kernel refused 'add flowtable' with ENOENT: no"
        " NF_FLOW_TABLE (nf_flow_table_inet)); no flowtable; 0 of 4 forwarded flows"
        " offloaded; classic-path packets of offloaded flows: none counted"
    )
    code, out, _ = run("status", "--netns", lab.router, "--json")
    doc = json.loads(out)
    assert (doc["forwarded_flows"], doc["forwarded_offloaded"], doc["kernel"]["can_offload"]) == (
        4,
        0,
        False,
    )
    assert doc["verdict"].startswith("kernel CANNOT offload (kernel refused 'add flowtable'")


def test_status_config_exit_code_is_the_drift(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "nat.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "nat": {"masquerade": [{"oifname": "wan"}]}}))
    code, out, _ = run("status", "--netns", lab.router, "--config", str(cfg))
    assert code == 1 and "drift: pending: + table inet offloadctl" in out, out
    assert run("apply", str(cfg), "--netns", lab.router)[0] == 0
    code, out, _ = run("status", "--netns", lab.router, "--config", str(cfg))
    assert code == 0 and out.splitlines()[-1] == "  drift: none", out
    sh("nft", "add rule inet offloadctl srcnat counter", netns=lab.router)
    code, out, _ = run("status", "--netns", lab.router, "--config", str(cfg), "--json")
    assert code == 1 and json.loads(out)["drift"], out

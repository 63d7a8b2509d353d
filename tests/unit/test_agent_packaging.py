"""The systemd unit and the Kubernetes manifests are well-formed and say what we mean.

No cluster runs here: the DaemonSet is checked structurally, and its embedded
config is parsed by the same parser as ``offloadctl validate``. The unit is
checked by ``systemd-analyze verify`` when systemd is installed.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.loader import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging/systemd/offloadctl-agent.service"
MANIFEST = ROOT / "packaging/kubernetes/offloadctl-agent.yaml"
CAPS = {"NET_ADMIN", "BPF", "SYS_ADMIN"}


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_fields() -> None:
    svc = unit()["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["ExecStart"].split()[:2] == ["/usr/bin/offloadctl", "agent"]
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert {c.removeprefix("CAP_") for c in svc[key].split()} == CAPS, key
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["RuntimeDirectoryMode"] == "0700"  # the control socket's directory


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    # verify insists the ExecStart binary exists: point it at one that does.
    text = UNIT.read_text().replace("/usr/bin/offloadctl", sys.executable)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr  # unknown keys are only warned about


def docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_daemonset_shape() -> None:
    found = docs()
    assert set(found) == {"ConfigMap", "DaemonSet"}
    ds = found["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (ctr,) = pod["containers"]
    sec = ctr["securityContext"]
    assert sec["privileged"] is False and sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"]["drop"] == ["ALL"] and set(sec["capabilities"]["add"]) == CAPS
    assert ctr["command"][:2] == ["offloadctl", "agent"]
    args = ctr["args"]
    metrics = next(a for a in args if a.startswith("--metrics="))
    assert metrics.endswith(":9108") and "--metrics-allow-remote" in args
    env = {e["name"] for e in ctr.get("env", [])}
    assert "$(NODE_IP)" in metrics and "NODE_IP" in env
    ports = {p["name"]: p for p in ctr["ports"]}
    assert ports["metrics"]["containerPort"] == 9108
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    assert volumes["config"]["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    config_path = ctr["command"][2]
    assert config_path.startswith(mounts["config"]["mountPath"] + "/")
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf"
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"


def test_configmap_config_parses() -> None:
    cm = docs()["ConfigMap"]
    ds = docs()["DaemonSet"]
    name = Path(ds["spec"]["template"]["spec"]["containers"][0]["command"][2]).name
    cfg = parse_config(yaml.safe_load(cm["data"][name]))
    assert cfg.flowtables


@pytest.mark.parametrize("path", sorted((ROOT / "examples/configs").glob("*.yaml")), ids=str)
def test_example_configs_validate(path: Path) -> None:
    load_config(path)


def test_the_three_examples_exist() -> None:
    names = {p.name for p in (ROOT / "examples/configs").glob("*.yaml")}
    assert {"router.yaml", "hypervisor-bridge.yaml", "service-host.yaml"} <= names

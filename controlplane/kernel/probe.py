"""What this kernel can do, each answer with its reason. Changes nothing.

Flowtables are probed by asking the kernel to *check* (not commit) a
throwaway table with a flowtable; VLAN support by creating a VLAN in a
short-lived private namespace of a forked child.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

from controlplane.kernel.netns import entered, unshare_net


@dataclass(frozen=True)
class Capability:
    name: str
    ok: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def flowtables(netns: str | None = None) -> Capability:
    from controlplane.kernel.nft.libnft import Nft

    ok, why = Nft(netns).flowtables_supported()
    return Capability("flowtables", ok, why)


def vlan() -> Capability:
    pid = os.fork()
    if pid == 0:  # child: private netns, so nothing is left behind anywhere
        code = 2
        try:
            unshare_net()
            from pyroute2 import IPRoute

            ipr = IPRoute()
            ipr.link("add", ifname="probe0", kind="veth", peer="probe1")
            try:
                ipr.link(
                    "add",
                    ifname="probe0.7",
                    kind="vlan",
                    link=ipr.link_lookup(ifname="probe0")[0],
                    vlan_id=7,
                )
                code = 0
            except Exception:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return Capability("vlan", True, "created a VLAN device in a scratch namespace")
    if code == 1:
        return Capability("vlan", False, "kernel refused a VLAN device: no 8021q support")
    return Capability("vlan", False, "could not set up the VLAN probe (need root)")


def bpffs(path: str = "/sys/fs/bpf") -> Capability:
    try:
        with open("/proc/self/mounts") as f:
            mounted = any(ln.split()[1] == path and ln.split()[2] == "bpf" for ln in f)
    except OSError as exc:
        return Capability("bpffs", False, f"cannot read mounts: {exc}")
    if mounted:
        return Capability("bpffs", True, f"bpf filesystem mounted at {path}")
    if os.path.isdir(path):
        return Capability(
            "bpffs", True, f"{path} exists but is not mounted; 'reuseport load' mounts it"
        )
    return Capability("bpffs", False, f"{path} does not exist")


def reuseport_migration(netns: str | None = None) -> Capability:
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    with entered(netns):
        has_sysctl = os.path.exists("/proc/sys/net/ipv4/tcp_migrate_req")
    if (major, minor) >= (5, 14) and has_sysctl:
        return Capability(
            "reuseport-migration",
            True,
            f"kernel {release} has net.ipv4.tcp_migrate_req and SELECT_OR_MIGRATE (5.14+)",
        )
    return Capability(
        "reuseport-migration", False, f"kernel {release} predates listener migration (5.14)"
    )


def conntrack(netns: str | None = None) -> Capability:
    with entered(netns):
        ok = os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max")
    if ok:
        return Capability("conntrack", True, "nf_conntrack is available")
    return Capability("conntrack", False, "no /proc/sys/net/netfilter/nf_conntrack_max")


def probe_all(netns: str | None = None, bpffs_path: str = "/sys/fs/bpf") -> list[Capability]:
    return [
        flowtables(netns),
        vlan(),
        bpffs(bpffs_path),
        reuseport_migration(netns),
        conntrack(netns),
    ]

"""Record the rtnetlink messages tests/unit/test_rtnl_oracle.py decodes (run as root).

    .venv/bin/python -m tests.netns.record_rtnl > tests/unit/data/rtnl.json

Builds a scratch namespace (bridge, veth ports, one of them down, IPv4/IPv6
neighbours, static FDB entries, routes via a gateway, via another family
(RTA_VIA) and over several paths (RTA_MULTIPATH), conntrack entries with a
zone, a mark, DNAT and labels), dumps it, answers route lookups, and writes
every message as the kernel sent it. The host kernel has neither VLAN nor bond
devices nor VLAN filtering on bridges: a VLAN, a bond and a filtering bridge
are built with pyroute2's own encoder (``"source": "pyroute2 encoder"``), and
``--vlan`` adds a scene the VM's kernel can make (802.1ad and QinQ VLAN
devices, a filtering 802.1ad bridge with per-VLAN FDB entries): its messages
are in the same file, recorded once in the VM (``"source": "Linux 6.1...``)::

    vm-tests/run --results build/vm-rec -- sh -c 'modprobe 8021q &&
        .venv/bin/python -m tests.netns.record_rtnl --vlan > build/vm-rec/rtnl.json'
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from functools import partial
from typing import Any

from controlplane.kernel.netlink import NLM_F_DUMP, NLM_F_REQUEST, NetlinkSocket
from controlplane.kernel.rtnl.codec import DUMPS, dump_request
from controlplane.kernel.rtnl.topology import encode_route_get

NS = "decoder-record"
SETUP = """
link add br0 type bridge
link add p1 type veth peer name p1peer
link add p2 type veth peer name p2peer
link add p3 type veth peer name p3peer
link set p1 master br0
link set p2 master br0
link set br0 up
link set p1 up
link set p1peer up
link set p2 up
link set p3 up
link set p3peer up
addr add 10.0.1.1/24 dev br0
addr add 2001:db8:1::1/64 dev br0 nodad
addr add 10.0.3.1/24 dev p3
neigh add 10.0.1.9 lladdr 02:00:00:00:00:09 dev br0 nud permanent
neigh add 2001:db8:1::9 lladdr 02:00:00:00:00:19 dev br0 nud permanent
neigh add 10.0.3.9 lladdr 02:00:00:00:03:09 dev p3 nud reachable
route add 198.51.100.0/24 via 10.0.1.9
route add 203.0.113.0/24 nexthop via 10.0.1.9 dev br0 nexthop via 10.0.3.9 dev p3
route add 192.0.2.0/24 via inet6 2001:db8:1::9 dev br0
route add 2001:db8:2::/64 via 2001:db8:1::9
"""
BRIDGE = """
fdb add 02:00:00:00:00:01 dev p1 master static
fdb add 02:00:00:00:00:02 dev p2 master static
"""
# Real conntrack entries with a zone, NAT and labels: nft sets them on packets
# the namespace sends itself (UDP to 127.0.0.5:9, DNATed to 127.0.0.1:19; UDP over IPv6).
CT_RULES = """
table inet rec {
  chain raw { type filter hook output priority raw; ct zone set 7; }
  chain out { type filter hook output priority filter; ct mark set 42; ct label set 3; }
  chain nat { type nat hook output priority -100; udp dport 9 dnat ip to 127.0.0.1:19; }
}
"""
VLAN_SETUP = """
link add br1 type bridge vlan_filtering 1 vlan_protocol 802.1ad vlan_default_pvid 7
link add q1 type veth peer name q1peer
link set q1 master br1
link add link p3 name p3.100 type vlan protocol 802.1ad id 100
link add link p3.100 name p3.100.10 type vlan id 10
link set br1 up
link set q1 up
link set q1peer up
link set p3.100 up
"""
VLAN_BRIDGE = """
vlan add vid 10 dev q1
fdb add 02:00:00:00:00:0a dev q1 master static vlan 10
fdb add 02:00:00:00:00:0b dev q1 master static vlan 7
"""
LOOKUPS = ["198.51.100.7", "203.0.113.7", "192.0.2.7", "2001:db8:2::7", "10.0.1.1"]


def build(ns: str, vlan: bool = False) -> None:
    """The scene, in namespace ``ns`` (also the live differential test's)."""
    scripts = [("ip", SETUP), ("bridge", BRIDGE)]
    if vlan:
        scripts += [("ip", VLAN_SETUP), ("bridge", VLAN_BRIDGE)]
    for tool, script in scripts:
        for line in script.strip().splitlines():
            subprocess.run([tool, "-n", ns, *line.split()], check=True)


def _constructed() -> list[dict[str, Any]]:
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    out: list[dict[str, Any]] = []
    for what, kind, data, extra in (
        (
            "vlan 802.1ad id 100 on if 2",
            "vlan",
            {"attrs": [("IFLA_VLAN_ID", 100), ("IFLA_VLAN_PROTOCOL", 0x88A8)]},
            [("IFLA_LINK", 2)],
        ),
        ("bond port master", "bond", {"attrs": [("IFLA_BOND_MODE", 4)]}, []),
        (
            "bridge filtering 802.1ad pvid 7",
            "bridge",
            {
                "attrs": [
                    ("IFLA_BR_VLAN_FILTERING", 1),
                    ("IFLA_BR_VLAN_PROTOCOL", 0x88A8),
                    ("IFLA_BR_VLAN_DEFAULT_PVID", 7),
                ]
            },
            [],
        ),
    ):
        msg = ifinfmsg()
        msg["header"]["type"] = 16  # RTM_NEWLINK
        msg["family"] = socket.AF_UNSPEC
        msg["index"] = 40 + len(out)
        msg["flags"] = 0x1 | 0x10000  # IFF_UP | IFF_LOWER_UP
        msg["attrs"] = [
            ("IFLA_IFNAME", f"{kind}0"),
            *extra,
            ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", kind), ("IFLA_INFO_DATA", data)]}),
        ]
        msg.encode()
        out.append({"what": what, "source": "pyroute2 encoder", "hex": msg.data.hex()})
    return out


_DUMP = NLM_F_REQUEST | NLM_F_DUMP


def _conntrack(ns: str, kernel: str) -> list[dict[str, Any]]:
    from controlplane.kernel.ctnetlink import conntrack as ct

    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=CT_RULES.encode(), check=True
    )
    send = (
        "import socket;"
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.5', 9));"
        "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'x', ('::1', 7))"
    )
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", send], check=True)
    found: list[dict[str, Any]] = []

    def keep(kind: int, buf: bytes, s: int, e: int) -> None:
        found.append({"what": "conntrack dump", "source": kernel, "hex": buf[s:e].hex()})

    with NetlinkSocket(ct.NETLINK_NETFILTER, ns, operation="record") as nl:
        nl.dump(
            "record",
            lambda seq: ct._message(ct.CT_GET, _DUMP, seq, 0, b""),
            keep,
        )
    return found


def main() -> None:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        build(NS, vlan="--vlan" in sys.argv[1:])
        kernel = f"Linux {platform.release()}"
        found: list[dict[str, Any]] = []
        with NetlinkSocket(socket.NETLINK_ROUTE, NS, operation="record") as nl:
            for source, requests in sorted(DUMPS.items()):
                for kind, family in requests:

                    def keep(_k: int, buf: bytes, s: int, e: int, source: str = source) -> None:
                        found.append(
                            {"what": f"{source} dump", "source": kernel, "hex": buf[s:e].hex()}
                        )

                    nl.dump("record", partial(dump_request, kind, family), keep)
            for reply in nl.transact("record", LOOKUPS, encode_route_get):
                found.append(
                    {"what": f"route get {reply.item}", "source": kernel, "hex": reply.data.hex()}
                )
        found += _conntrack(NS, kernel)
        json.dump(found + _constructed(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=True)


if __name__ == "__main__":
    main()

"""The plugin's pure parts: topology descriptions refused before anything is made, the
commands they become, run names, and the wire parser."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from controlplane.testing import Bridge, Netns, Route, Topology, TopologyError, Veth, Vlan
from controlplane.testing import topology as topo
from controlplane.testing.traffic import Packet, parse_frame

PAIR = [Veth("a:eth0", "b:eth0")]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Topology({"a": Netns()}, PAIR), "veth a:eth0 - b:eth0: no namespace 'b'"),
        (lambda: Topology({"a": Netns(), "b": Netns()}, [*PAIR, Veth("a:eth0", "b:x")]),
         "veth: device 'eth0' declared twice in 'a'"),
        (lambda: Topology({"a": Netns(vlans=[Vlan("v.10", "v", 10), Vlan("v", "eth0", 5)]),
                           "b": Netns()}, PAIR),
         "a: vlan v.10: parent 'v' is not declared (before it)"),
        (lambda: Topology({"a": Netns(bridges=[Bridge("br0", ports=["p1"])]), "b": Netns()}, PAIR),
         "a: bridge br0: no port device 'p1'"),
        (lambda: Topology({"a": Netns(addresses={"eth1": "10.0.0.1/24"}), "b": Netns()}, PAIR),
         "a: addresses: no device 'eth1'"),
        (lambda: Topology({"a": Netns(addresses={"eth0": "10.0.0.1"}), "b": Netns()}, PAIR),
         "addresses[eth0]: '10.0.0.1' needs a prefix length"),
        (lambda: Topology({"A": Netns()}), "namespaces: role 'A' is not 1-16 of [a-z0-9_]"),
        (lambda: Vlan("v", "eth0", 4095), "vlan v: id 4095 is not in 1-4094"),
        (lambda: Vlan("v", "eth0", 5, "802.1x"),  # type: ignore[arg-type]
         "vlan v: protocol '802.1x': 802.1Q or 802.1ad"),
        (lambda: Bridge("br0", ports=["p"], tagged={"p": [10]}),
         "bridge br0: tagged/untagged need vlan_filtering=True"),
        (lambda: Bridge("br0", ports=["p"], vlan_filtering=True, untagged={"q": 10}),
         "bridge br0: VLAN port 'q' is not in ports"),
        (lambda: Veth("a:eth0", "a:eth0"), "veth: both ends are 'a:eth0'"),
        (lambda: Veth("a", "b:eth0"), "veth: 'a' is not 'namespace:device'"),
        (lambda: Veth("a:much-too-long-name", "b:x"), "veth: 'much-too-long-name' is not a dev"),
        (lambda: Route("default"), "route default: give via, dev or both"),
        (lambda: Route("10.0.0.0/33", "10.0.0.1"), "route '10.0.0.0/33': not a prefix"),
    ],
)  # fmt: skip
def test_bad_descriptions_are_one_error_naming_the_field(build: object, message: str) -> None:
    with pytest.raises(TopologyError) as err:
        t = build()  # type: ignore[operator]
        t.check()
    assert str(err.value).startswith(message)


def test_qinq_on_a_bridge_port_and_vlan_on_a_bridge_resolve() -> None:
    Topology(
        {
            "r": Netns(
                bridges=[Bridge("br0", ports=["lan0.100.10"], vlan_filtering=True)],
                vlans=[
                    Vlan("lan0.100", "lan0", 100, "802.1ad"),
                    Vlan("lan0.100.10", "lan0.100", 10),
                    Vlan("br0.20", "br0", 20),
                ],
                addresses={"br0.20": "10.0.0.1/24"},
                routes=[Route("10.9.0.0/16", dev="br0.20")],
            ),
            "h": Netns(),
        },
        [Veth("r:lan0", "h:eth0")],
    ).check()


def test_commands() -> None:
    br = Bridge(
        "br0", ports=["a", "b", "c"], vlan_filtering=True,
        tagged={"a": [10, 20], "c": [1, 30]}, untagged={"b": 20},
    )  # fmt: skip
    assert br.commands() == [
        "vlan add dev a vid 10",
        "vlan add dev a vid 20",
        "vlan del dev a vid 1",
        "vlan add dev b vid 20 pvid untagged",
        "vlan del dev b vid 1",
        "vlan add dev c vid 1",
        "vlan add dev c vid 30",
        "vlan add dev br0 vid 1 self",
        "vlan add dev br0 vid 10 self",
        "vlan add dev br0 vid 20 self",
        "vlan add dev br0 vid 30 self",
    ]
    assert Route("default6", "fd00::1").command() == "route add ::/0 via fd00::1"
    assert Route("10.0.0.0/8", dev="wan0").command() == "route add 10.0.0.0/8 dev wan0"


def test_run_names_say_whose_they_are() -> None:
    mine = topo.new_name("router")
    assert mine.startswith(f"otst-{os.getpid()}_") and mine.endswith("-router")
    assert topo.owner_alive(mine)
    pid, start = mine.split("-")[1].split("_")
    assert not topo.owner_alive(f"otst-{pid}_{start}x-1-router")  # same pid, other process
    assert topo.owner_alive("cpt-12345")  # not ours: never touched
    assert topo.ours(["otst-1_a-1-x", "cpt-1", "otst-x"]) == ["otst-1_a-1-x"]


def _eth(ethertype: int, payload: bytes, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    head = b"\x02" * 6 + b"\x04" * 6
    for tpid, vid in tags:
        head += struct.pack("!HH", tpid, vid)
    return head + struct.pack("!H", ethertype) + payload


def test_parse_frame() -> None:
    ip4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                      socket.inet_aton("10.0.1.2"), socket.inet_aton("192.0.2.2"))  # fmt: skip
    tcp = struct.pack("!HH", 40000, 443) + b"\0" * 16
    assert parse_frame(_eth(0x0800, ip4 + tcp)) == Packet(
        "tcp", "10.0.1.2", 40000, "192.0.2.2", 443
    )
    udp4 = ip4[:9] + b"\x11" + ip4[10:]
    qinq = _eth(0x0800, udp4 + struct.pack("!HH", 53, 5353), ((0x88A8, 100), (0x8100, 10)))
    assert parse_frame(qinq) == Packet("udp", "10.0.1.2", 53, "192.0.2.2", 5353)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64,
                      socket.inet_pton(socket.AF_INET6, "fd00:1::2"),
                      socket.inet_pton(socket.AF_INET6, "fd00:2::2"))  # fmt: skip
    v6 = _eth(0x86DD, ip6 + struct.pack("!HH", 1, 2))
    assert parse_frame(v6) == Packet("udp", "fd00:1::2", 1, "fd00:2::2", 2)
    assert parse_frame(_eth(0x0806, b"\0" * 28)) is None  # ARP
    assert parse_frame(_eth(0x0800, ip4[:9] + b"\x01" + ip4[10:] + b"\0" * 8)) is None  # ICMP

"""Test an offloadctl config in network namespaces (and in the VM) before rollout.

The pytest plugin (``controlplane.testing.plugin``, loaded by the ``pytest11`` entry point
``offloadctl``) gives tests the ``netlab`` fixture and the ``offload_vm`` marker; this
package holds what a test writes with them::

    from controlplane.testing import Bridge, Netns, Route, Topology, Veth

See the README, "Test your config", and ``examples/testing/``.
"""

from controlplane.testing.lab import Lab, NetLab
from controlplane.testing.observe import ClassicPath, Count
from controlplane.testing.shell import CommandFailed, sh
from controlplane.testing.topology import (
    Bridge,
    Netns,
    Route,
    Topology,
    TopologyError,
    Veth,
    Vlan,
)
from controlplane.testing.traffic import Capture, Exchange, TcpConn, TrafficError, UdpConn

__all__ = [
    "Bridge",
    "Capture",
    "ClassicPath",
    "CommandFailed",
    "Count",
    "Exchange",
    "Lab",
    "NetLab",
    "Netns",
    "Route",
    "TcpConn",
    "Topology",
    "TopologyError",
    "TrafficError",
    "UdpConn",
    "Veth",
    "Vlan",
    "sh",
]

"""Which devices a flowtable must hook, derived from the topology the way the kernel
resolves a forward path; and which of them still let offloaded flows take the
classic path. Pure.

How the kernel picks the ingress device of a flow (6.1, ``nft_flow_route`` →
``nft_dev_forward_path`` → ``dev_fill_forward_path``): from the route's output
device it walks down ``ndo_fill_forward_path`` (bridge → FDB port, VLAN →
lower device, QinQ twice) and takes the *last* device of that stack. If that
device is in the flowtable, the reverse direction's packets are expected on
it (direct transmit); otherwise the kernel falls back to the route's own
device (neighbour transmit). Hence:

- **Bridge port that is a VLAN/QinQ sub-interface** (``br0`` ← ``veth0.10`` ←
  ``veth0``): the route device is ``br0`` (never a useful hook: its ingress
  runs after the bridge), so only the real device under the port can be the
  hook. Listing the VLAN port itself leaves that direction on the classic path
  while conntrack still says ``[OFFLOAD]`` (measured in the VM: 4,256
  forward-hook packets for 4 MiB). We hook the lowest real device.
- **Routed VLAN device** (L3 on ``veth0.10``): both work. With ``veth0.10``
  listed the kernel uses neighbour transmit through the VLAN device; with
  ``veth0`` listed it uses direct transmit, which caches the next hop's MAC
  and needs cache invalidation when it moves. We keep what the user listed
  (no device the user did not name is hooked outside ``bridges:``), so routed
  VLAN flows stay on the self-healing neighbour path.
- **An explicit VLAN device that is a bridge port** can never be the hook:
  it is resolved to its lowest real device, with a note saying so (never
  silently): the user meant "offload through this port".
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from controlplane.config import Config, Flowtable
from controlplane.core.flowpath import Link
from controlplane.errors import EnvironmentProblem

__all__ = [
    "DeviceSet",
    "LinkFacts",
    "Member",
    "classic_counter_names",
    "classic_counter_of",
    "classic_path_report",
    "derive_devices",
    "explain",
    "lowest_device",
]

K = TypeVar("K")

# dev_fill_forward_path() stops after NET_DEVICE_PATH_STACK_MAX (5) devices.
_MAX_HOPS = 5

# Named counters of packets of already-offloaded flows that still reached the
# forward hook, one per input device the forward hook sees (see
# DeviceSet.ingress). The prefix keeps them apart from "classic_path" and
# makes every name start with a letter.
CLASSIC_IN_PREFIX = "classic_in_"
# The same, for input devices no flowtable's ingress map names (a VLAN upper
# of a bridge, say): nothing is left uncounted. The suffix is longer than an
# interface name can be (15), so it cannot collide with a device's counter.
CLASSIC_IN_OTHER = CLASSIC_IN_PREFIX + "any_other_device"


def classic_counter_names(devices: Iterable[str]) -> dict[str, str]:
    """Device → the name of its ``classic_in_*`` counter, for all devices of a table.

    Counter names are nft object names (``config.ObjName``: no dots), device
    names may hold dots: ``lan0.10`` → ``classic_in_lan0_10``. Two devices
    that would share a name (``a.1`` and ``a_1``) both get a short hash of the
    device name appended, so names stay readable and unique.
    """
    devs = sorted(set(devices))
    plain = {d: CLASSIC_IN_PREFIX + d.replace(".", "_") for d in devs}
    taken: dict[str, int] = {}
    for name in plain.values():
        taken[name] = taken.get(name, 0) + 1
    return {d: name if taken[name] == 1 else _hashed(name, d) for d, name in plain.items()}


def _hashed(plain: str, device: str) -> str:
    return f"{plain}_{hashlib.sha256(device.encode()).hexdigest()[:6]}"


def classic_counter_of(device: str, counters: Collection[str]) -> str:
    """The ``classic_in_*`` counter (among ``counters``, a table's) that counts
    packets entering through ``device``: its own, else the catch-all."""
    plain = CLASSIC_IN_PREFIX + device.replace(".", "_")
    for name in (_hashed(plain, device), plain):
        if name in counters:
            return name
    return CLASSIC_IN_OTHER


@dataclass(frozen=True)
class LinkFacts:
    """The links rendering needs: bridge ports by bridge name, links by name.

    ``links`` holds at least each bridge port and listed device and, for VLAN
    devices, their lower devices (``Link.lower`` is an ifindex). Missing
    entries mean "unknown": a device is then taken as it is named.
    """

    bridge_ports: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    links: Mapping[str, Link] = field(default_factory=dict)

    def by_index(self) -> dict[int, Link]:
        return {link.ifindex: link for link in self.links.values()}


@dataclass(frozen=True)
class Member:
    """One device of a flowtable and every reason it is there."""

    name: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class DeviceSet:
    """``ingress``: the input device the *forward hook* sees for traffic entering
    through these members (the bridge for a bridge port, the device itself for
    a routed one) → those members. Classic-path packets are counted by it:
    the forward hook never sees the port or the real device underneath."""

    flowtable: str
    members: tuple[Member, ...]  # sorted by name
    notes: tuple[str, ...] = ()  # explicit devices we had to resolve
    ingress: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)


def lowest_device(link: Link, by_index: Mapping[int, Link]) -> tuple[Link, list[str]]:
    """Walk VLAN devices down to the real device; also the names walked through.

    Raises EnvironmentProblem when the lower device is not in this namespace
    (a VLAN whose parent lives elsewhere cannot be hooked here) or the chain
    is longer than the kernel would follow.
    """
    chain = [link.name]
    cur = link
    while cur.kind == "vlan" and cur.lower is not None:
        if len(chain) > _MAX_HOPS:
            raise EnvironmentProblem(
                f"{link.name}: more than {_MAX_HOPS} stacked devices; the kernel's"
                " forward path stops there"
            )
        lower = by_index.get(cur.lower)
        if lower is None:
            raise EnvironmentProblem(
                f"{cur.name}: its lower device (ifindex {cur.lower}) is not in this network"
                " namespace, so no flowtable here can hook the real device under it"
            )
        cur = lower
        chain.append(cur.name)
    return cur, chain


def derive_devices(ft: Flowtable, facts: LinkFacts, where: str = "") -> DeviceSet:
    """The devices ``ft`` must hook, each with the reasons (see the module doc).

    ``where`` prefixes notes with the config path of the flowtable
    (``flowtables[0]``).
    """
    by_index = facts.by_index()
    reasons: dict[str, list[str]] = {}
    notes: list[str] = []
    ingress: dict[str, set[str]] = {}

    def add(name: str, why: str, l3: str | None = None) -> None:
        reasons.setdefault(name, []).append(why)
        ingress.setdefault(l3 or name, set()).add(name)

    prefix = f"{where}." if where else ""
    for j, dev in enumerate(ft.devices):
        link = facts.links.get(dev)
        if link is None or link.kind != "vlan" or link.master is None:
            master = by_index.get(link.master) if link and link.master is not None else None
            add(dev, "listed in devices", master.name if master is not None else None)
            continue
        master = by_index.get(link.master)
        master_name = master.name if master is not None else f"ifindex {link.master}"
        real, chain = lowest_device(link, by_index)
        add(
            real.name,
            f"lower device of {dev} (listed; a port of {master_name})",
            master.name if master is not None else None,
        )
        notes.append(
            f"{prefix}devices[{j}]: {dev} is a VLAN device and a port of {master_name}:"
            f" the kernel resolves the bridge path to {real.name}, so {real.name} is hooked"
            f" instead (list {master_name} under bridges: to say so)"
        )
    for bridge in ft.bridges:
        for port in facts.bridge_ports.get(bridge, ()):
            link = facts.links.get(port)
            if link is None or link.kind != "vlan":
                add(port, f"port of bridge {bridge}", bridge)
                continue
            real, chain = lowest_device(link, by_index)
            via = f"lower device of bridge port {port} of {bridge}"
            if len(chain) > 2:
                via += f" (through {', '.join(chain[1:-1])})"
            add(real.name, via, bridge)
    members = tuple(Member(name, tuple(reasons[name])) for name in sorted(reasons))
    seen_as = tuple((l3, tuple(sorted(devs))) for l3, devs in sorted(ingress.items()))
    return DeviceSet(ft.name, members, tuple(notes), seen_as)


def derive_all(cfg: Config, facts: LinkFacts) -> tuple[DeviceSet, ...]:
    return tuple(
        derive_devices(ft, facts, f"flowtables[{i}]") for i, ft in enumerate(cfg.flowtables)
    )


def explain(sets: Iterable[DeviceSet]) -> list[str]:
    """Human lines: each derived device and why, then the notes."""
    lines: list[str] = []
    for ds in sets:
        lines.append(f"flowtable {ds.flowtable}:")
        width = max((len(m.name) for m in ds.members), default=0)
        for m in ds.members:
            lines.append(f"  {m.name:<{width}}  ({'; '.join(m.reasons)})")
        if not ds.members:
            lines.append("  (no devices: bridges without ports?)")
        lines += [f"  note: {n}" for n in ds.notes]
        for l3, devs in ds.ingress:
            if devs != (l3,):
                lines.append(f"  classic path counted as input {l3} for {', '.join(devs)}")
    return lines


# --- per-direction truth ------------------------------------------------------


@dataclass(frozen=True)
class ClassicPath:
    """Packets of offloaded flows that entered through ``ingress`` (as the forward
    hook names it) and still took the classic forward path. A few per flow are
    normal (packets in flight when the flow was added, FIN/RST which the fast
    path hands back); many mean the flowtable does not hook the device under
    this ingress, so that direction is not offloaded, whatever conntrack's
    ``[OFFLOAD]`` says."""

    ingress: str  # the counter's device ("lan0_10" for lan0.10) or "(other)"
    counter: str
    packets: int
    bytes: int
    suspect: bool


# Above this many packets an input is flagged. Measured in the VM (6.1, TCG):
# a healthy multi-MiB transfer leaves 0-4 forward-hook packets per direction;
# the unhooked VLAN bridge port ~45 offloaded-flow packets per 8 MiB (ACKs
# coalesce under TCG; 4,256 per 4 MiB were reported on faster machines).
# The counters are cumulative and every offloaded TCP flow hands its FIN/RST
# to the classic path, so on a busy router compare two readings (``baseline``)
# rather than trusting the total.
SUSPECT_PACKETS = 32


def classic_path_report(
    counters: Mapping[str, tuple[int, int]],
    threshold: int = SUSPECT_PACKETS,
    baseline: Mapping[str, tuple[int, int]] | None = None,
) -> list[ClassicPath]:
    """The ``classic_in_*`` counters of a table listing ((packets, bytes) by counter
    name) as a per-input report, suspects first; other counters are ignored.
    With ``baseline`` (an earlier reading), the growth since then is reported."""
    out: list[ClassicPath] = []
    for name, (packets, nbytes) in counters.items():
        if not name.startswith(CLASSIC_IN_PREFIX):
            continue
        if baseline is not None:
            p0, b0 = baseline.get(name, (0, 0))
            packets, nbytes = packets - p0, nbytes - b0
        shown = "(other)" if name == CLASSIC_IN_OTHER else name[len(CLASSIC_IN_PREFIX) :]
        out.append(ClassicPath(shown, name, packets, nbytes, packets > threshold))
    return sorted(out, key=lambda c: (not c.suspect, c.ingress))


def unhooked_directions(
    paths: Mapping[K, tuple[tuple[str, ...], tuple[str, ...]]],
    suspect_inputs: Iterable[str],
) -> dict[K, tuple[str, ...]]:
    """Flows with a direction entering through a suspect input device.

    ``paths``: flow → (orig egress device chain, reply egress chain) by name,
    top device first (``flowpath.FlowPath``). The kernel forces the reverse
    route through the input interface, so the devices a direction *enters*
    through are the egress chain of the other one: the orig direction enters
    through the reply chain (e.g. br0, lan0.10, lan0). ``suspect_inputs``:
    ``ClassicPath.ingress`` values of suspect reports (counter suffixes, so
    ``lan0_10`` stands for ``lan0.10``). Returns flow → its unhooked
    directions ("orig"/"reply"); such a flow must not be counted as offloaded.
    """
    suspect = frozenset(suspect_inputs)

    def hit(chain: tuple[str, ...]) -> bool:
        return any(d.replace(".", "_") in suspect for d in chain)

    out: dict[K, tuple[str, ...]] = {}
    for flow, (orig, reply) in paths.items():
        bad = [name for name, chain in (("orig", reply), ("reply", orig)) if hit(chain)]
        if bad:
            out[flow] = tuple(bad)
    return out

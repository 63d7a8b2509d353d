"""The flow index: from an event's key straight to the offloaded flows it can affect.

No lookup walks all flows. The index has three levels:

- **flows** (:class:`FlowRecord`): one compact record per offloaded conntrack
  entry, identified like the kernel does (zone + original tuple), holding
  the :class:`~controlplane.core.flowpath.Egress` each direction cached when
  it was offloaded;
- **addresses**: each flow is filed under its two *egress addresses* (where
  each direction is routed: ``reply.src`` and ``orig.src``, NAT-aware), and
  addresses sit in per-prefix buckets so that a route change for a prefix
  finds the addresses inside it (:meth:`FlowIndex.addresses_in`);
- **groups** (:class:`Group`): addresses with the same route and next hop
  share one egress (every Internet host behind the default gateway is one
  group; a LAN host is its own). Groups are filed under the keys their
  egress consulted: device ifindexes, ``(ifindex, next hop ip)`` for
  neighbours, ``(bridge, vlan, mac)`` for the FDB (:meth:`FlowIndex.groups_by`).

So an FDB, neighbour or link event finds its groups by key, their addresses,
then their flows; a route event finds addresses by prefix. The cost is
proportional to what the event touches.

Memory (100,000 flows): records are slotted and pack ports, zone, id, mark
and status into one int; address strings are shared; collections that
usually hold one element store it bare (the ``_bag_*`` helpers). ``bench/bench_engine.py``
measures bytes per flow.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import replace
from sys import intern
from typing import Any

from controlplane.core.flowpath import (
    IPS_OFFLOAD,
    CtTuple,
    Egress,
    FdbKey,
    Flow,
    NeighbourKey,
    Route,
)

__all__ = [
    "DepKey",
    "FlowIndex",
    "FlowRecord",
    "Group",
    "GroupKey",
    "PruneRound",
    "egress_addresses",
]

# What a group's egress depends on: a device (ifindex), a neighbour
# (ifindex, ip) or an FDB entry (bridge, vlan, mac).
DepKey = int | NeighbourKey | FdbKey
# Addresses share a group when their route and next hop are the same.
GroupKey = tuple[Route | None, str | None]

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_STATUS_BITS = _U32 << 64  # where FlowRecord packs the status


_NO_EGRESS: tuple[Egress | None, Egress | None] = (None, None)
# (orig, reply) pairs shared by the records that cached the same two egresses
# (all flows between the same two groups): one tuple for thousands of records
# instead of two slots each. Keyed by identity, not by value: hashing an
# Egress on every event would cost the hot path; the stored pair keeps both
# objects alive, so their ids are not reused while the entry exists. Cleared
# when it outgrows _PAIRS_MAX (records keep their pairs; new ones start
# sharing anew), so it stays bounded whatever the churn.
_pairs: dict[tuple[int, int], tuple[Egress | None, Egress | None]] = {}
_PAIRS_MAX = 4096


def _egress_pair(orig: Egress | None, reply: Egress | None) -> tuple[Egress | None, Egress | None]:
    key = (id(orig), id(reply))
    pair = _pairs.get(key)
    if pair is None:
        if len(_pairs) >= _PAIRS_MAX:
            _pairs.clear()
        pair = _pairs[key] = (orig, reply)
    return pair


class FlowRecord:
    """One offloaded flow, compact: enough to rebuild its :class:`Flow` for a teardown.

    ``orig``/``reply``: the egress each direction cached (``None`` until the
    route to its egress address is known). Equal and hashed by identity
    (zone + original tuple), as conntrack identifies entries.
    """

    # Without NAT the reply tuple mirrors the original (odst == rsrc, rdst ==
    # osrc): those records keep two addresses, and only :class:`_NatRecord`
    # (NAT changed an address) has slots for the other two (16 bytes per
    # flow less: 88 -> 72 bytes a record).
    # ``orig``/``reply`` live in one shared pair (``_egress``, see
    # :func:`_egress_pair`): 4 slots, a 64-byte block instead of 80.
    __slots__ = ("_bits", "_egress", "osrc", "rsrc")

    def __new__(cls, flow: Flow) -> FlowRecord:
        o, r = flow.orig, flow.reply
        mirrored = o.dst == r.src and r.dst == o.src
        return object.__new__(FlowRecord if mirrored else _NatRecord)

    def __init__(self, flow: Flow) -> None:
        o, r = flow.orig, flow.reply
        # Decoders make a new string per event; interned, 100,000 flows share
        # a few thousand address strings (~180 bytes per flow saved).
        self.osrc, self.rsrc = intern(o.src), intern(r.src)
        self._egress: tuple[Egress | None, Egress | None] = _NO_EGRESS
        if o.icmp_id is not None or o.proto > 255 or r.proto != o.proto:
            # Not a port protocol (flowtables never offload these): keep it whole.
            self._bits: int | Flow = flow
            return
        self._bits = (
            (((flow.zone << 8 | o.proto) << 16 | o.sport) << 16 | o.dport) << 128
            | (r.sport << 16 | r.dport) << 96
            | (flow.status & _U32) << 64
            | (flow.id & _U32) << 32
            | (flow.mark & _U32)
        )

    def _identity(self) -> tuple[Any, ...]:
        bits = self._bits
        if isinstance(bits, Flow):
            return (bits.zone, bits.orig)
        return (bits >> 128, self.osrc, self.odst)

    def __hash__(self) -> int:
        return hash(self._identity())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowRecord) and self._identity() == other._identity()

    def same_entry(self, other: FlowRecord) -> bool:
        """Given equal identities: the same conntrack entry, unchanged (id, mark,
        reply tuple)? Status bits are not compared: they change all the time."""
        a, b = self._bits, other._bits
        if isinstance(a, Flow) or isinstance(b, Flow):
            return (
                isinstance(a, Flow)
                and isinstance(b, Flow)
                and (a.id, a.mark, a.reply) == (b.id, b.mark, b.reply)
            )
        return (a ^ b) & ~_STATUS_BITS == 0 and self.rsrc == other.rsrc and self.rdst == other.rdst

    def flow(self) -> Flow:
        """The conntrack entry as it was seen (tuples, zone, id, mark, status)."""
        bits = self._bits
        if isinstance(bits, Flow):
            return bits
        ident = bits >> 128
        zone, proto = ident >> 40, ident >> 32 & 0xFF
        family = 10 if ":" in self.osrc else 2
        return Flow(
            orig=CtTuple(family, proto, self.osrc, self.odst, ident >> 16 & _U16, ident & _U16),
            reply=CtTuple(
                family, proto, self.rsrc, self.rdst, bits >> 112 & _U16, bits >> 96 & _U16
            ),
            id=bits >> 32 & _U32,
            zone=zone,
            mark=bits & _U32,
            status=bits >> 64 & _U32,
        )

    @property
    def offloaded(self) -> bool:
        bits = self._bits
        status = bits.status if isinstance(bits, Flow) else bits >> 64
        return bool(status & IPS_OFFLOAD)

    def cache(self, orig: Egress | None, reply: Egress | None) -> None:
        """Set both cached egresses at once (one shared-pair lookup, not two)."""
        self._egress = _egress_pair(orig, reply)

    @property
    def orig(self) -> Egress | None:
        return self._egress[0]

    @orig.setter
    def orig(self, egress: Egress | None) -> None:
        self._egress = _egress_pair(egress, self._egress[1])

    @property
    def reply(self) -> Egress | None:
        return self._egress[1]

    @reply.setter
    def reply(self, egress: Egress | None) -> None:
        self._egress = _egress_pair(self._egress[0], egress)

    @property
    def odst(self) -> str:
        return self.rsrc

    @property
    def rdst(self) -> str:
        return self.osrc

    def __repr__(self) -> str:
        return f"FlowRecord({self.flow()!r})"


class _NatRecord(FlowRecord):
    """A :class:`FlowRecord` whose reply tuple does not mirror the original (NAT)."""

    __slots__ = ("odst", "rdst")  # shadow the mirrored properties of FlowRecord

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow)
        self.odst, self.rdst = intern(flow.orig.dst), intern(flow.reply.dst)  # type: ignore[misc]


def egress_addresses(record: FlowRecord) -> tuple[str, str]:
    """Where each direction is routed: (orig → ``reply.src``, reply → ``orig.src``)."""
    return record.rsrc, record.osrc


class Group:
    """Addresses whose packets leave the same way: same route, same next hop."""

    __slots__ = ("addresses", "deps", "egress", "key")

    def __init__(self, key: GroupKey) -> None:
        self.key = key
        self.egress: Egress | None = None
        self.deps: tuple[DepKey, ...] = ()
        self.addresses: Any = None  # a bag of address strings

    @property
    def route(self) -> Route | None:
        return self.key[0]

    def __repr__(self) -> str:
        return f"Group({self.key!r}, {self.egress!r})"


def group_key(route: Route | None, address: str) -> GroupKey:
    if route is None or route.local or route.oif is None:
        return (route, None)
    return (route, route.gateway or address)


def dependencies(egress: Egress) -> tuple[DepKey, ...]:
    """The keys whose change can change ``egress`` (devices, neighbour, FDB entries)."""
    keys: list[DepKey] = list(egress.devices)
    if egress.neighbour is not None:
        keys.append(egress.neighbour)
    keys.extend(egress.fdb)
    return tuple(dict.fromkeys(keys))


# -- bags: a set that stores a single element bare ---------------------------------
# Most addresses carry one flow and most buckets one address; an empty set
# costs 216 bytes, so a one-element bag is the element itself.


def _bag_with(bag: Any, item: Any) -> Any:
    if bag is None:
        return item
    if isinstance(bag, dict):
        bag[item] = item
        return bag
    # A dict, not a set: it returns the stored element (the index has no
    # other map from a probe record to the indexed one) and, below a few
    # hundred elements, takes less memory than a set.
    return bag if bag == item else {bag: bag, item: item}


def _bag_without(bag: Any, item: Any) -> Any:
    if isinstance(bag, dict):
        bag.pop(item, None)
        if len(bag) > 1:
            return bag
        return next(iter(bag)) if bag else None
    return None if bag == item else bag


def _bag_get(bag: Any, item: Any) -> Any:
    if isinstance(bag, dict):
        return bag.get(item)
    return bag if bag is not None and bag == item else None


def _bag_items(bag: Any) -> tuple[Any, ...]:
    if bag is None:
        return ()
    if isinstance(bag, dict):
        return tuple(bag)
    return (bag,)


class _Address:
    __slots__ = ("flows", "group")

    def __init__(self) -> None:
        self.group: Group | None = None
        self.flows: Any = None  # a bag of FlowRecord


_BUCKET_BITS = {4: 24, 6: 64}


class _PrefixBuckets:
    """Addresses by prefix: buckets of /24 (IPv4) and /64 (IPv6), bucket keys sorted.

    A query for a shorter prefix takes whole buckets from a bisected range of
    keys; a longer one filters one bucket. Hand-written rather than a radix
    tree library: two dicts and a sorted list are all the queries need.
    """

    def __init__(self) -> None:
        self._buckets: dict[tuple[int, int], list[str]] = {}
        self._keys: dict[int, list[int]] = {4: [], 6: []}

    @staticmethod
    def _key(address: str) -> tuple[int, int]:
        if ":" not in address:
            # The /24 of canonical dotted-quad text, without ipaddress's ~10 us parse.
            a, b, c, _ = address.split(".")
            return 4, int(a) << 16 | int(b) << 8 | int(c)
        ip = ipaddress.IPv6Address(address)
        return 6, int(ip) >> (128 - _BUCKET_BITS[6])

    def add(self, address: str) -> None:
        key = self._key(address)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = []
            bisect.insort(self._keys[key[0]], key[1])
        bucket.append(address)

    def discard(self, address: str) -> None:
        key = self._key(address)
        bucket = self._buckets.get(key)
        if bucket is None or address not in bucket:
            return
        bucket.remove(address)
        if not bucket:
            del self._buckets[key]
            keys = self._keys[key[0]]
            del keys[bisect.bisect_left(keys, key[1])]

    def within(self, prefix: str) -> list[str]:
        net = ipaddress.ip_network(prefix, strict=False)
        bits = _BUCKET_BITS[net.version]
        shift = net.max_prefixlen - bits
        first, last = int(net.network_address) >> shift, int(net.broadcast_address) >> shift
        keys = self._keys[net.version]
        found: list[str] = []
        for bucket_key in keys[bisect.bisect_left(keys, first) : bisect.bisect_right(keys, last)]:
            bucket = self._buckets[(net.version, bucket_key)]
            if net.prefixlen <= bits:
                found.extend(bucket)
            else:
                found.extend(a for a in bucket if ipaddress.ip_address(a) in net)
        return found


class FlowIndex:
    """Offloaded flows by identity, egress address, address prefix and dependency key."""

    def __init__(self) -> None:
        self._count = 0
        self._addresses: dict[str, _Address] = {}
        self._prefixes = _PrefixBuckets()
        self._groups: dict[GroupKey, Group] = {}
        self._by_dep: dict[DepKey, Any] = {}  # key → bag of Group

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[FlowRecord]:
        """Every indexed record once (a snapshot: the index may change meanwhile)."""
        # Each record is filed under its orig egress address (rsrc) exactly once.
        found = [
            record
            for address, entry in self._addresses.items()
            for record in _bag_items(entry.flows)
            if record.rsrc == address
        ]
        return iter(found)

    # -- flows ------------------------------------------------------------------

    def get(self, record: FlowRecord) -> FlowRecord | None:
        """The indexed record equal to ``record`` (same zone and original tuple)."""
        entry = self._addresses.get(record.rsrc)
        return _bag_get(entry.flows, record) if entry is not None else None

    def add(self, record: FlowRecord) -> list[str]:
        """File ``record`` (not yet indexed); returns its egress addresses that are new."""
        self._count += 1
        new: list[str] = []
        for address in dict.fromkeys(egress_addresses(record)):
            entry = self._addresses.get(address)
            if entry is None:
                entry = self._addresses[address] = _Address()
                self._prefixes.add(address)
                new.append(address)
            entry.flows = _bag_with(entry.flows, record)
        return new

    def remove(self, record: FlowRecord) -> FlowRecord | None:
        """Forget the record equal to ``record``; returns the indexed one, if any."""
        found = self.get(record)
        if found is None:
            return None
        self._count -= 1
        for address in dict.fromkeys(egress_addresses(found)):
            entry = self._addresses[address]
            entry.flows = _bag_without(entry.flows, found)
            if entry.flows is None:
                self._drop_address(address, entry)
        return found

    def flows_of(self, address: str) -> tuple[FlowRecord, ...]:
        entry = self._addresses.get(address)
        return _bag_items(entry.flows) if entry is not None else ()

    # -- addresses and routes ---------------------------------------------------------

    def knows(self, address: str) -> bool:
        """Is ``address`` the egress address of an indexed flow?"""
        return address in self._addresses

    def addresses(self) -> list[str]:
        return list(self._addresses)

    def addresses_in(self, prefix: str) -> list[str]:
        """Indexed egress addresses inside ``prefix`` (no walk of all addresses)."""
        return self._prefixes.within(prefix)

    def group_of(self, address: str) -> Group | None:
        entry = self._addresses.get(address)
        return entry.group if entry is not None else None

    def route_known(self, address: str) -> bool:
        return self.group_of(address) is not None

    def place(self, address: str, route: Route | None) -> tuple[Group | None, Group] | None:
        """Put an indexed ``address`` in the group of ``route``.

        Returns ``(old group, new group)``, or ``None`` if the address is not
        indexed or already there. A new group has ``egress`` ``None``: the
        caller resolves it and calls :meth:`set_egress`.
        """
        entry = self._addresses.get(address)
        if entry is None:
            return None
        key = group_key(route, address)
        old = entry.group
        if old is not None and old.key == key:
            return None
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group(key)
        if old is not None:
            self._leave(old, address)
        group.addresses = _bag_with(group.addresses, address)
        entry.group = group
        return old, group

    def _leave(self, group: Group, address: str) -> None:
        group.addresses = _bag_without(group.addresses, address)
        if group.addresses is None:
            self.set_egress(group, None)
            del self._groups[group.key]

    def _drop_address(self, address: str, entry: _Address) -> None:
        if entry.group is not None:
            self._leave(entry.group, address)
        del self._addresses[address]
        self._prefixes.discard(address)

    def group_addresses(self, group: Group) -> tuple[str, ...]:
        return _bag_items(group.addresses)

    def groups(self) -> list[Group]:
        return list(self._groups.values())

    # -- groups by dependency --------------------------------------------------------------

    def set_egress(self, group: Group, egress: Egress | None) -> None:
        """Record the group's current egress and file it under the keys it depends on."""
        deps = dependencies(egress) if egress is not None else ()
        if deps != group.deps:
            for key in group.deps:
                bag = _bag_without(self._by_dep.get(key), group)
                if bag is None:
                    self._by_dep.pop(key, None)
                else:
                    self._by_dep[key] = bag
            for key in deps:
                self._by_dep[key] = _bag_with(self._by_dep.get(key), group)
            group.deps = deps
        group.egress = egress

    def groups_by(self, keys: Iterable[DepKey]) -> list[Group]:
        """Groups whose egress depends on any of ``keys``, each once."""
        found: dict[Group, None] = {}
        for key in keys:
            for group in _bag_items(self._by_dep.get(key)):
                found[group] = None
        return list(found)


class _Marks:
    """The indexed records a dump found, in ~200 KB at 100,000 records.

    A set of 100,000 records or ids costs 4-7 MB, and Python keeps that memory
    after the round (RSS 56 -> 65 MB measured, against a 60 MB goal). Instead,
    each record sets 3 bits of a 16-bits-per-record array (a Bloom filter).
    A marked record always reads as marked: a live flow is never dropped. An
    unmarked (dead) one reads as marked with p ~0.5%: it survives this round,
    and the next round, salted differently, drops it.
    """

    __slots__ = ("_bits", "_salt", "_size")

    def __init__(self, expected: int, salt: int) -> None:
        # At least 64 KiB of bits: small indexes get a negligible error.
        self._bits = bytearray(max(8192, 2 * expected))
        self._size = len(self._bits) * 8 - 1  # odd: the 3 slices spread over all bits
        self._salt = salt

    def _slots(self, record: FlowRecord) -> tuple[int, int, int]:
        h = hash((self._salt, record)) & 0xFFFFFFFFFFFFFFFF
        size = self._size
        return h % size, (h >> 21) % size, (h >> 42) % size

    def add(self, record: FlowRecord) -> None:
        bits = self._bits
        for slot in self._slots(record):
            bits[slot >> 3] |= 1 << (slot & 7)

    def __contains__(self, record: FlowRecord) -> bool:
        bits = self._bits
        return all(bits[slot >> 3] & 1 << (slot & 7) for slot in self._slots(record))


class PruneRound:
    """One prune of the index against a conntrack dump that arrives in pieces.

    Why: with ``nf_conntrack_events=2`` (the default) entries created before
    any listener existed never report DESTROY, and a DESTROY can be lost; such
    records would stay in the index for good. A periodic re-dump finds them.
    The dump is read in bounded steps while events keep being handled, so the
    round never decides about an entry an event spoke for meanwhile: the
    caller reports each such entry with :meth:`touch` and the event stream
    stays its authority (a NEW after its hash bucket was dumped, a DESTROY
    after the entry was dumped).

    Decisions, collected for :meth:`take` / :meth:`finish` as flows for the
    caller to feed the engine (``FlowGone`` / ``FlowSeen``); the round only
    reads the index:

    - an offloaded entry the index lacks: *seen* (its NEW was missed);
    - an indexed record whose entry changed (a new conntrack id under the same
      tuple: the old entry died; or a new mark or reply tuple): *gone*, and
      the dumped entry *seen* if it is offloaded or is the same entry;
    - an indexed record whose entry is absent from the whole dump: *gone*.

    A record whose entry is still there unchanged is kept even if the dump
    shows it off the fast path: the kernel re-offloads an entry silently (no
    event), so dropping it would lose the flow until the next round.

    ``touched_limit`` bounds the memory of a round: past it the round is
    abandoned (``overflowed``) and decides nothing more. ``salt``: a number
    that differs from round to round (see :class:`_Marks`: a dead record that
    one round keeps by chance, the next one drops).
    """

    def __init__(self, index: FlowIndex, *, touched_limit: int = 65_536, salt: int = 0) -> None:
        self._index = index
        self._limit = touched_limit
        # Indexed records the dump found unchanged (by identity).
        self._kept = _Marks(len(index), salt)
        # Identities this round added or replaced (FlowRecord hashes by identity).
        self._confirmed: set[FlowRecord] = set()
        self._touched: set[FlowRecord] = set()
        # Decided, not yet taken: indexed records to drop (held, not copied as
        # Flows: a round may drop a whole start-up population), flows to add.
        self._gone: list[FlowRecord] = []
        self._seen: list[Flow] = []
        self._unscanned: list[FlowRecord] = []  # the index at finish(), not yet checked
        self.finished = False
        self.overflowed = False
        self.dumped_entries = 0
        self.gone = self.added = self.changed = 0

    def abandon(self) -> None:
        """Decide nothing more (a resync superseded the round, or it outgrew its bound)."""
        self.overflowed = True
        self._touched.clear()
        self._confirmed.clear()
        self._kept = _Marks(0, 0)
        self._unscanned.clear()
        self._gone.clear()
        self._seen.clear()

    def touch(self, flow: Flow) -> None:
        """An event about ``flow``'s entry was handled during the round."""
        if self.overflowed:
            return
        self._touched.add(FlowRecord(flow))
        if len(self._touched) > self._limit:
            self.abandon()

    def dumped(self, flow: Flow) -> None:
        """One entry of the dump (as the caller would index it)."""
        if self.overflowed:
            return
        self.dumped_entries += 1
        record = FlowRecord(flow)
        if self._touched and record in self._touched:
            return
        indexed = self._index.get(record)
        if indexed is None:
            if record.offloaded:
                self._confirmed.add(record)
                self._seen.append(flow)
                self.added += 1
            return
        if indexed.same_entry(record):
            self._kept.add(indexed)
            return
        self._confirmed.add(record)
        self.changed += 1
        self._gone.append(indexed)
        if record.offloaded or indexed.flow().id == flow.id:
            self._seen.append(replace(flow, status=flow.status | IPS_OFFLOAD))

    def take(self, limit: int | None = None) -> tuple[list[Flow], list[Flow]]:
        """Up to ``limit`` decisions not yet taken: (gone, seen), to apply in that
        order. A decision an event overtook since (its entry touched, or its
        record no longer the indexed one) is dropped: the event is newer."""
        if limit is None:
            self._scan(len(self._unscanned))
            limit = len(self._gone) + len(self._seen)
        else:
            # Check one slice of the index per call (~2.5 us a record: the filter
            # hashes each), whatever it finds: dead records are usually sparse,
            # and filling a batch could mean checking the whole index at once.
            self._scan(8 * limit)
        gone_batch, self._gone = self._gone[:limit], self._gone[limit:]
        limit -= len(gone_batch)
        seen_batch, self._seen = self._seen[:limit], self._seen[limit:]
        touched, get = self._touched, self._index.get
        gone = [r.flow() for r in gone_batch if r not in touched and get(r) is r]
        if touched:
            seen_batch = [f for f in seen_batch if FlowRecord(f) not in touched]
        return gone, seen_batch

    def finish(self) -> None:
        """The dump is complete: decide about the records it did not confirm
        (hand the decisions out with :meth:`take` until :attr:`done`)."""
        self.finished = True
        if not self.overflowed:
            # A snapshot (~7 ms at 100,000), checked by take() a slice at a time.
            # Records indexed after it came from events or from this round; those
            # dropped since are skipped by take().
            self._unscanned = list(self._index)

    def _scan(self, count: int) -> None:
        if count <= 0 or not self._unscanned:
            return
        batch = self._unscanned[-count:]
        del self._unscanned[-count:]
        kept, confirmed, touched = self._kept, self._confirmed, self._touched
        for record in batch:
            if record in kept or record in confirmed or record in touched:
                continue
            self._gone.append(record)
            self.gone += 1
        if not self._unscanned:
            self._kept, self._confirmed = _Marks(0, 0), set()

    @property
    def done(self) -> bool:
        """Finished and every decision taken."""
        return self.finished and not self._unscanned and not self._gone and not self._seen

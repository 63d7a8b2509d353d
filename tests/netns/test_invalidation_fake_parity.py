"""tests/unit/fake_invalidation.py fails where the kernel fails: the same operations on
the real invalidation ports (``kernel/invalidation.open_ports`` in a fresh namespace)
and on the fake give the same answers and the same errnos."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import replace

from controlplane.config import InvalidationConfig
from controlplane.core.flowpath import Flow, Link
from controlplane.errors import KernelError
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.kernel.invalidation import open_ports
from controlplane.kernel.ports import InvalidationPorts
from tests.netns.test_flowprune import TIMEOUT, tcp
from tests.unit.fake_invalidation import FakeKernel
from tests.unit.test_invalidation import World


def outcome(op: Callable[[], object]) -> object:
    try:
        return op()
    except KernelError as exc:
        return errno.errorcode.get(exc.errno or 0, exc.errno)


def script(ports: InvalidationPorts, make: Callable[[Flow], None]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []

    def do(name: str, op: Callable[[], object]) -> None:
        out.append((name, outcome(op)))

    ct, changes, dump = ports.conntrack, ports.changes, ports.dump
    do("poll before open", lambda: changes.poll())
    changes.open()
    ports.rtnl.open()
    a, absent = tcp(1), tcp(2)
    make(a)
    [news] = changes.poll()[0]  # the kernel's entry, with its id
    do("NEW", lambda: (news.flow.orig == a.orig, news.new, news.gone))
    flow = news.flow
    do("statuses", lambda: [s is not None for _, s in ct.statuses([flow, absent])])
    wrong = ct.delete([replace(flow, id=flow.id + 1)])
    do("delete, other id", lambda: (wrong.deleted, wrong.already_gone))
    done = ct.delete([flow])
    do("delete", lambda: (done.deleted, done.already_gone, ct.last_deleted == [flow]))
    do("DESTROY", lambda: [(c.flow.orig == a.orig, c.gone) for c in changes.poll()[0]])
    do("re-create", lambda: ct.reinject([flow]))
    do("re-create again", lambda: ct.reinject([flow]))
    do("NEW of ours", lambda: [(c.new, c.gone) for c in changes.poll()[0]])
    do("dump not begun", lambda: dump.read(100))
    dump.begin()
    dumped: list[Flow] = []
    for _ in range(1000):
        got, complete = dump.read(100)
        dumped += got
        if complete:
            break
    do("dumped", lambda: [f.orig == a.orig for f in dumped])
    do("no route", lambda: ports.routes.lookup(["10.9.9.9"]))
    do("links", lambda: {link.name for link in ports.rtnl.snapshot().topology.links.values()})
    waiter = ports.waiter
    waiter.wake()
    do("woken", lambda: list(waiter.wait([changes.fileno()], 0.0)) == [waiter.fileno()])
    do("not woken", lambda: list(waiter.wait([changes.fileno()], 0.0)))
    for close in (ports.rtnl.close, changes.close, dump.close, waiter.close):
        close()
    do("watcher closed", lambda: ports.rtnl.fileno())
    do("watcher poll closed", lambda: ports.rtnl.poll(10))
    do("conntrack events closed", lambda: changes.poll())
    waiter.wake()  # harmless once closed (a late signal handler)
    ct.close()
    ports.routes.close()
    return out


def test_the_fake_ports_answer_as_the_kernel_does(make_netns: Callable[[], str]) -> None:
    netns = make_netns()

    def real_make(flow: Flow) -> None:
        with ConntrackSocket(netns) as ct:
            assert ct.create([(flow, TIMEOUT)]) == (1, 0)

    real = script(open_ports(netns, InvalidationConfig()), real_make)
    kernel = FakeKernel(World(links={1: Link(1, "lo", "")}))

    def fake_make(flow: Flow) -> None:
        kernel.add(flow)

    fake = script(kernel.ports(None, InvalidationConfig()), fake_make)
    assert fake == real

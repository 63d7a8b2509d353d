"""Listener migration against the real kernel, after the kernel's own selftest
(tools/testing/selftests/bpf/prog_tests/migrate_reuseport.c).

Each case queues N connections on generation 1's four listeners, brings up
generation 2, then closes generation 1 without accepting. With the program
every client is served by generation 2 with its payload intact and the
counters say N; without it (same dance, sysctl tcp_migrate_req at its default
0) every client is reset. The states covered:

- TCP_ESTABLISHED: completed handshakes waiting in the accept queue;
- TCP_NEW_SYN_RECV: half-open requests (an nft rule drops the client's final
  ACK), migrated when the ACK finally gets through ("ack") or, after ~1 s,
  when the SYN-ACK retransmit timer fires ("timer");
- TCP_SYN_RECV: TCP Fast Open children, accept()able before the final ACK.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.kernel.bpf.loader import load_group
from controlplane.kernel.netns import entered
from controlplane.reuseport import Counters, ReuseportGroup
from tests.netns import test_reuseport_support as sup

N = 50
GEN1_LISTENERS = 4


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


@dataclass(frozen=True)
class Case:
    state: str  # established | request | fastopen
    request_path: str = ""  # for requests: "ack" or "timer"

    @property
    def drop_ack(self) -> bool:
        return self.state in ("request", "fastopen")

    def __str__(self) -> str:
        return self.state + (f"-{self.request_path}" if self.request_path else "")


CASES = [
    Case("established"),
    Case("request", "ack"),
    Case("request", "timer"),
    Case("fastopen"),
]
FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


def run_dance(
    netns: str, bpffs: str | None, family: int, case: Case, tmp_path: Path
) -> tuple[sup.Outcome, list[bytes], Counters | None]:
    """The restart dance; with the program iff ``bpffs`` is given."""
    group = None
    if bpffs is not None:
        load_group("svc", netns=netns, bpffs=bpffs)
        group = ReuseportGroup.open("svc", netns=netns, bpffs=bpffs)
    if case.state == "fastopen":
        # Client and server TFO, no cookies needed (as the selftest sets it).
        sup.sysctl(netns, "net.ipv4.tcp_fastopen", "519")
    fastopen = case.state == "fastopen"
    with entered(netns):
        gen1 = [sup.listener(family, fastopen=fastopen) for _ in range(GEN1_LISTENERS)]
    if group is not None:
        for s in gen1:
            group.register(s, 1)
        group.activate(1)
    if case.drop_ack:
        sup.drop_final_ack(netns, str(tmp_path))

    clients = sup.open_clients(netns, family, N, fastopen=fastopen)
    if case.state == "request":
        sup.wait_for("half-open requests", lambda: sup.syn_recv_count(netns) == N)
        assert sum(sup.accept_queue(s) for s in gen1) == 0
    else:
        sup.wait_for("queued children", lambda: sum(sup.accept_queue(s) for s in gen1) == N)

    with entered(netns):
        gen2 = sup.listener(family, fastopen=fastopen)
    if group is not None:
        group.register(gen2, 2)
        group.activate(2)
        group.retire(1)
    # The restart: generation 1 goes away without accepting anything.
    for s in gen1:
        s.close()
    if case.request_path == "timer":
        # The SYN-ACK retransmit timer (~1 s) handles the requests of the closed
        # listeners before any ACK gets through: with the program it migrates
        # them (counted), without it the kernel drops them (none left).
        if group is not None:
            sup.wait_for(
                "the timer to migrate every request",
                lambda: group.counters().migrated_request == N,
            )
        else:
            sup.wait_for("the timer to drop every request", lambda: sup.syn_recv_count(netns) == 0)
    if case.drop_ack:
        sup.pass_ack(netns)

    with gen2:
        served = sup.serve(gen2, N, timeout=4.0 if group is not None else 0.5)
        outcome = sup.collect(clients, timeout=6.0)
    counters = group.counters() if group is not None else None
    if group is not None:
        group.close()
    return outcome, served, counters


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_migrates_every_queued_connection(
    netns: str, bpffs: str, family: int, case: Case, tmp_path: Path
) -> None:
    outcome, served, counters = run_dance(netns, bpffs, family, case, tmp_path)

    expected = sorted(sup.payload(i) for i in range(N))
    assert sorted(served) == expected, "generation 2 must receive every payload intact"
    assert outcome.reset == 0 and outcome.other == []
    assert sorted(outcome.served) == sorted(b"new:" + p for p in expected)
    assert counters is not None
    migrated = (
        counters.migrated_established if case.state == "established" else counters.migrated_request
    )
    assert migrated == N
    assert counters.selected == N  # every SYN was steered to generation 1
    assert counters.migrated == N  # nothing counted twice or in the wrong bucket
    assert (counters.dropped, counters.fallback) == (0, 0)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_without_program_the_same_dance_resets(
    netns: str, family: int, case: Case, tmp_path: Path
) -> None:
    outcome, served, _ = run_dance(netns, None, family, case, tmp_path)

    assert served == []
    assert outcome.reset == N, f"expected {N} resets, got {outcome}"

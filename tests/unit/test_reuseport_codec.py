"""Pure encodings around the reuseport maps and the fd-handover wire format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core.reuseport_policy import MAX_GENERATION, Target
from controlplane.errors import KernelError
from controlplane.kernel.bpf import fd_handover as fh
from controlplane.reuseport import _decode_target, _encode_target


@given(
    capacity=st.integers(min_value=1, max_value=64),
    gen=st.integers(min_value=0, max_value=MAX_GENERATION),
    drop=st.booleans(),
    data=st.data(),
)
def test_target_table_round_trips(capacity: int, gen: int, drop: bool, data: st.DataObject) -> None:
    slots = data.draw(
        st.lists(st.integers(0, capacity - 1), unique=True, max_size=capacity).map(tuple)
    )
    t = Target(gen, slots, drop)
    raw = _encode_target(t, capacity)
    # struct target_table in kernel/bpf/reuseport_migrate.c: 4 u32 + MAX_SLOTS u32.
    assert len(raw) == 16 + 4 * capacity
    assert _decode_target(raw, capacity) == t


@given(st.integers(min_value=1, max_value=MAX_GENERATION))
def test_handover_request_round_trips(gen: int) -> None:
    assert fh.parse_request(fh.format_request(gen)) == gen


@pytest.mark.parametrize(
    "bad", [b"", b"register", b"register generation=", b"register generation=-1", b"x=1\n"]
)
def test_handover_rejects_malformed_requests(bad: bytes) -> None:
    with pytest.raises(ValueError, match="expected 'register generation=<N>'"):
        fh.parse_request(bad)


def test_handover_replies() -> None:
    assert fh.parse_reply(fh.format_reply(3)) == 3
    # A multi-line error travels as one line.
    with pytest.raises(KernelError, match=r"^hand listener to the agent: socket is not listening$"):
        fh.parse_reply(fh.format_reply(None, "socket is\nnot listening"))
    with pytest.raises(KernelError, match="closed without a reply"):
        fh.parse_reply(b"")

"""Properties of the agent over hostile input (issue 15): whatever arrives on
the control socket (random bytes, JSON of random depth and number sizes,
truncated lines, duplicate keys), the agent answers it, stays up and answers
every well-formed request after it; whatever the state file holds, the agent
starts or refuses with StateError (exit 4), nothing else.

The agent here is the real ``Agent`` behind a real ``ControlServer`` on a Unix
socket, with fake kernel ports (tests/netns/test_agent_hardening.py sends the
same kind of lines to the real process)."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.agent import protocol
from controlplane.agent import state as state_mod
from controlplane.agent.daemon import Agent
from controlplane.agent.state import StateError
from tests.unit.test_agent_control import Running, read_line
from tests.unit.test_agent_daemon import make_agent
from tests.unit.test_fuzz import (
    json_objects_with_duplicates,
    json_values,
    long_numbers,
    mutated,
    nested,
)

REQUESTS = [protocol.encode_request(op).rstrip(b"\n") for op in ("status", "flows")]
STATE = state_mod.AppliedState(None, "/etc/offloadctl/agent.yaml", "ab" * 32, "inet", "t", 1.0)
STATE_BYTES = json.dumps(STATE.to_json()).encode()


def hostile_lines() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=4096),
        json_values().map(lambda v: json.dumps(v).encode()),
        json_objects_with_duplicates(),
        nested().filter(lambda b: len(b) <= protocol.MAX_LINE),
        long_numbers().map(lambda n: b'{"v":' + n + b',"op":"status"}'),
        long_numbers().map(lambda n: b'{"v":1,"op":"flows","limit":' + n + b"}"),
        mutated(REQUESTS),
        st.sampled_from(REQUESTS).flatmap(
            lambda r: st.integers(0, len(r) - 1).map(lambda n: r[:n])
        ),
    ).map(lambda b: b.replace(b"\n", b" "))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, Running]]:
    tmp = tmp_path_factory.mktemp("agent")
    agent, _applier, _cfg = make_agent(tmp, io.StringIO())
    agent.start()
    rundir = tmp / "run"
    rundir.mkdir(mode=0o700)
    running = Running(rundir / "a.sock", allowed_uids=frozenset({0, *range(1, 65536)}))
    running.server._handler = agent.handle
    yield agent, running
    running.close()


def _send(path: Path, line: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line + b"\n")
        return read_line(s)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(hostile_lines(), min_size=1, max_size=4))
def test_every_bad_line_is_answered_and_good_ones_still_are(
    served: tuple[Agent, Running], lines: list[bytes]
) -> None:
    agent, running = served
    path = running.server.path
    with socket.socket(socket.AF_UNIX) as s:  # bad and good lines on one connection
        s.settimeout(10)
        s.connect(str(path))
        for line in lines:
            if not line.strip():
                continue  # an empty line is no request: no answer
            s.sendall(line + b"\n")
            reply = read_line(s)
            assert isinstance(reply.get("ok"), bool), reply
            s.sendall(protocol.encode_request("status"))
            assert read_line(s)["ok"] is True
    assert _send(path, protocol.encode_request("flows", limit=2).rstrip())["ok"] is True
    assert running._thread.is_alive()  # the server's loop never died
    assert agent.running is not None


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=2048),
        mutated([STATE_BYTES]),
        json_values().map(lambda v: json.dumps(v).encode()),
        json_values().map(lambda v: json.dumps({**STATE.to_json(), "table": v}).encode()),
        nested(),
        long_numbers().map(lambda n: b'{"schema":' + n + b"}"),
    )
)
def test_a_state_file_is_read_or_refused_with_state_error(raw: bytes) -> None:
    try:
        got = state_mod.decode(raw, "state.json")
    except StateError as exc:
        assert exc.exit_code == 4 and "state.json" in str(exc) and "\n" not in str(exc)
        return
    assert isinstance(got, state_mod.AppliedState)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(st.binary(max_size=512), mutated([STATE_BYTES]), nested()))
def test_the_agent_starts_or_refuses_its_state(tmp_path: Path, raw: bytes) -> None:
    agent, applier, _ = make_agent(tmp_path, io.StringIO())
    (tmp_path / "state.json").write_bytes(raw)
    try:
        agent.start()
    except StateError:
        assert applier.applied == []  # refused before touching the kernel
    else:
        assert applier.applied

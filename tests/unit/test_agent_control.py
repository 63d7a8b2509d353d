"""The control socket server and client over real Unix sockets (no kernel state).

The server runs on a selector pumped by a background thread, as the agent's
loop does; requests come from plain sockets so bad clients can be simulated.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import selectors
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.agent import control, protocol
from controlplane.agent.control import ControlServer
from controlplane.errors import EnvironmentProblem


def answer(req: protocol.Request) -> bytes:
    return protocol.ok({"op": req.op, "args": req.args})


class Running:
    def __init__(self, path: Path, **kw: object) -> None:
        self.sel = selectors.DefaultSelector()
        self.server = ControlServer(path, self.sel, answer, **kw)  # type: ignore[arg-type]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            for key, mask in self.sel.select(0.02):
                key.data(mask)
            self.server.expire()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()
        self.sel.close()


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def serve(sockdir: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(**kw: object) -> Running:
        kw.setdefault("allowed_uids", frozenset({os.geteuid()}))
        r = Running(sockdir / "a.sock", **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


def raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def read_line(s: socket.socket) -> dict[str, object]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    doc = json.loads(buf)
    assert isinstance(doc, dict)
    return doc


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_socket_is_0600_and_dir_checked(serve: Callable[..., Running], sockdir: Path) -> None:
    r = serve()
    st = os.lstat(r.server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_dir_writable_by_others_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(EnvironmentProblem, match="writable by group or others"):
        control.bind_socket(d / "a.sock")
    assert not (d / "a.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_dir_owned_by_someone_else_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(EnvironmentProblem, match="owned by uid 65534"):
        control.bind_socket(d / "a.sock")


def test_second_server_refused_stale_socket_replaced(
    serve: Callable[..., Running], sockdir: Path
) -> None:
    r = serve()
    with pytest.raises(EnvironmentProblem, match="another agent answers"):
        control.bind_socket(r.server.path)
    # a stale socket (bound, nobody listening) is replaced
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    control.bind_socket(stale).close()


def test_regular_file_not_replaced(sockdir: Path) -> None:
    f = sockdir / "a.sock"
    f.write_text("precious")
    with pytest.raises(EnvironmentProblem, match="not a socket"):
        control.bind_socket(f)
    assert f.read_text() == "precious"


def test_client_round_trip_and_no_agent(serve: Callable[..., Running], sockdir: Path) -> None:
    r = serve()
    client = control.connect(r.server.path)
    assert client is not None
    with client:
        resp = client.call("flows", limit=3)
        assert resp.ok and resp.result == {"op": "flows", "args": {"limit": 3}}
        assert client.call("status").result["op"] == "status"  # connection reusable
    assert control.connect(sockdir / "none.sock") is None
    assert control.try_client("x", sockdir / "none.sock") is None


def test_garbage_then_valid_request_on_same_connection(serve: Callable[..., Running]) -> None:
    r = serve()
    with raw(r.server.path) as s:
        s.sendall(b"\x00\xffgarbage\n")
        assert read_line(s)["error"] == {
            "code": "bad_request",
            "message": "not a JSON object on one line: not UTF-8 (byte 1)",
        }
        s.sendall(b'{"v": 7, "op": "status"}\n')
        err = read_line(s)["error"]
        assert isinstance(err, dict) and err["code"] == "unsupported_version"
        s.sendall(protocol.encode_request("status"))
        assert read_line(s)["ok"] is True
    assert r.server.stats.errors == 2


def test_oversized_line_answered_and_closed(serve: Callable[..., Running]) -> None:
    r = serve()
    with raw(r.server.path) as s:
        # the server may close before we finish sending: fine
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (protocol.MAX_LINE + 10))
        err = read_line(s)["error"]
        assert isinstance(err, dict) and err["code"] == "line_too_long"
        assert closed_by_peer(s)
    # the server still serves others
    with raw(r.server.path) as s:
        s.sendall(protocol.encode_request("status"))
        assert read_line(s)["ok"] is True


def test_silent_client_times_out_without_blocking_others(
    serve: Callable[..., Running],
) -> None:
    r = serve(idle_timeout=0.3)
    silent = raw(r.server.path)
    silent.sendall(b'{"v": 1, "op": "sta')  # half a line, then nothing
    with raw(r.server.path) as s:  # served meanwhile
        s.sendall(protocol.encode_request("status"))
        assert read_line(s)["ok"] is True
    assert closed_by_peer(silent)  # blocks until the server's idle deadline closes it
    silent.close()
    assert r.server.stats.timeouts >= 1


def test_client_that_never_reads_is_bounded(serve: Callable[..., Running]) -> None:
    r = serve(idle_timeout=10.0)
    greedy = raw(r.server.path)
    greedy.setblocking(False)
    request = protocol.encode_request("status", pad="p" * 1000)
    limit = 32 << 20
    sent = 0
    # Pipeline requests and never read the answers. A bounded server stops
    # reading once an answer is pending, so our socket stays unwritable;
    # one that keeps reading lets us push ``limit`` bytes.
    while sent < limit:
        _, writable, _ = select.select([], [greedy], [], 1.0)
        if not writable:
            break
        with contextlib.suppress(BlockingIOError):
            sent += greedy.send(request)
    assert sent < limit, "the server kept reading from a client that never reads"
    with raw(r.server.path) as s:
        s.sendall(protocol.encode_request("status"))
        assert read_line(s)["ok"] is True
    greedy.close()


def test_many_requests_in_one_write(serve: Callable[..., Running]) -> None:
    r = serve()
    n = 3000  # more than Python's recursion limit: the server must iterate
    with raw(r.server.path) as s:
        s.sendall(protocol.encode_request("status") * n)
        got = 0
        buf = b""
        while got < n:
            buf += s.recv(1 << 20)
            got = buf.count(b"\n")
    assert r.server.stats.requests == n


def test_peer_uid_checked(serve: Callable[..., Running]) -> None:
    r = serve(allowed_uids=frozenset({4242}))
    with raw(r.server.path) as s:
        err = read_line(s)["error"]
        assert isinstance(err, dict) and err["code"] == "permission_denied"
        assert closed_by_peer(s)


def test_connection_limit(serve: Callable[..., Running]) -> None:
    r = serve()
    held = [raw(r.server.path) for _ in range(control.MAX_CLIENTS)]
    for s in held:  # make sure each was accepted before the next
        s.sendall(protocol.encode_request("status"))
        read_line(s)
    with raw(r.server.path) as extra:
        err = read_line(extra)["error"]
        assert isinstance(err, dict) and err["code"] == "unavailable"
    for s in held:
        s.close()


def test_close_removes_socket(sockdir: Path) -> None:
    r = Running(sockdir / "b.sock", allowed_uids=frozenset({os.geteuid()}))
    r.close()
    assert not (sockdir / "b.sock").exists()


def test_client_reports_refusal_not_broken_pipe(serve: Callable[..., Running]) -> None:
    r = serve(allowed_uids=frozenset({4242}))
    for _ in range(20):  # the refusal races our send; each order must read the same
        client = control.connect(r.server.path)
        assert client is not None
        with client:
            resp = client.call("status", pad="p" * 300_000)
        assert not resp.ok and resp.error_code == "permission_denied"


def test_a_silent_agent_does_not_hang_the_client(sockdir: Path) -> None:
    """Issue 15 (F7): an agent frozen mid-request (it was, in open() of a FIFO)
    leaves the client waiting only as long as its timeout."""
    path = sockdir / "frozen.sock"
    with socket.socket(socket.AF_UNIX) as frozen:
        frozen.bind(str(path))
        frozen.listen(1)  # accepts into the backlog, never answers
        client = control.connect(path, timeout=0.2)
        assert client is not None
        with client, pytest.raises(control.AgentUnavailable, match="did not answer"):
            client.call("status", timeout=0.2)


def test_a_handler_bug_is_answered_and_serving_goes_on(serve: Callable[..., Running]) -> None:
    def broken(req: protocol.Request) -> bytes:
        if req.op == "reload":
            raise RecursionError("a bug of ours")
        return answer(req)

    r = serve()
    r.server._handler = broken
    with raw(r.server.path) as s:
        s.sendall(protocol.encode_request("reload"))
        err = read_line(s)["error"]
        assert isinstance(err, dict) and err["code"] == "internal"
        s.sendall(protocol.encode_request("status"))
        assert read_line(s)["ok"] is True

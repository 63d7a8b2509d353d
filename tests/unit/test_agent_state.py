"""The agent's state file: versioned, atomic, refused clearly when unusable."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from controlplane.agent import state
from controlplane.agent.state import AppliedState, StateError
from controlplane.errors import EnvironmentProblem

SAMPLE = AppliedState(
    netns="ns1",
    config_path="/etc/offloadctl/router.yaml",
    config_sha256="ab" * 32,
    table_family="inet",
    table_name="offloadctl",
    applied_at=1_700_000_000.5,
    reuseport_groups=("web",),
)


def test_round_trip_and_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "host" / "state.json"
    state.save(path, SAMPLE)
    assert state.load(path) == SAMPLE
    assert json.loads(path.read_text())["schema"] == state.SCHEMA_VERSION
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp left


def test_missing_file_is_no_state(tmp_path: Path) -> None:
    assert state.load(tmp_path / "absent.json") is None


def test_default_location() -> None:
    assert state.default_state_path(None) == Path("/var/lib/offloadctl/host/state.json")
    assert state.default_state_path("ns1") == Path("/var/lib/offloadctl/ns1/state.json")


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "state.json"
    p.write_text(json.dumps(doc))
    return p


def test_future_schema_refused_naming_versions(tmp_path: Path) -> None:
    doc = {**SAMPLE.to_json(), "schema": state.SCHEMA_VERSION + 1}
    with pytest.raises(StateError) as info:
        state.load(_write(tmp_path, doc))
    msg = str(info.value)
    assert f"schema {state.SCHEMA_VERSION + 1}" in msg and "newer offloadctl" in msg
    assert "Upgrade offloadctl" in msg and str(tmp_path) in msg
    assert info.value.exit_code == 4


def test_too_old_schema_refused(tmp_path: Path) -> None:
    doc = {**SAMPLE.to_json(), "schema": 0}
    with pytest.raises(StateError, match="too old"):
        state.load(_write(tmp_path, doc))


@pytest.mark.parametrize(
    "doc",
    [[], {"no": "schema"}, {"schema": "1"}, {"schema": True}, {"schema": 1, "netns": None}],
)
def test_malformed_refused(tmp_path: Path, doc: object) -> None:
    with pytest.raises(StateError, match="move it away"):
        state.load(_write(tmp_path, doc))


def test_not_json_refused(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    p.write_bytes(b"\xff{half")
    with pytest.raises(StateError, match="not valid JSON"):
        state.load(p)


def test_older_schema_goes_through_migrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend this version is schema 2 whose migration from 1 renames a key:
    # the reader must run it (and only then build the value).
    def v1_to_v2(doc: dict[str, object]) -> dict[str, object]:
        doc["config_path"] = str(doc.pop("old_config_path"))
        return doc

    monkeypatch.setattr(state, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(state, "_MIGRATIONS", {1: v1_to_v2})
    doc = SAMPLE.to_json()
    doc["schema"] = 1
    doc["old_config_path"] = doc.pop("config_path")
    assert state.load(_write(tmp_path, doc)) == SAMPLE


def test_save_is_atomic_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    state.save(path, SAMPLE)
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    changed = AppliedState(**{**SAMPLE.__dict__, "table_name": "other"})
    with pytest.raises(OSError):
        state.save(path, changed)
    assert path.read_bytes() == before  # the old state is intact
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # temp removed


def test_oversized_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "MAX_STATE_BYTES", 10)
    path = tmp_path / "state.json"
    state.save(path, SAMPLE)
    with pytest.raises(StateError, match="larger than"):
        state.load(path)


# Issue 15 (F9): each of these stopped the agent with exit 70, or hung its start.
@pytest.mark.parametrize(
    "raw",
    [
        b'{"schema": ' + b"1" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"schema": 1, "x": ' + b"{" * 50_000 + b"}" * 50_000 + b"}",
        b'{"schema": 1, "schema": 2}',
        b'{"schema": 1, "applied_at": NaN}',
        b"\xff\xfe",
    ],
)
def test_hostile_state_is_a_state_error(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "state.json"
    p.write_bytes(raw)
    with pytest.raises(StateError) as info:
        state.load(p)
    assert info.value.exit_code == 4 and "move it away" in str(info.value)


def test_a_fifo_as_state_file_is_refused_at_once(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    os.mkfifo(p)  # open() without O_NONBLOCK would wait for a writer forever
    with pytest.raises(StateError, match="FIFO"):
        state.load(p)


def test_a_symlink_as_state_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_text(json.dumps(SAMPLE.to_json()))
    (tmp_path / "state.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(StateError, match="symlink"):
        state.load(tmp_path / "state.json")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o722])
def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    """F11: anyone who can write the directory can plant the temp file's name."""
    shared = tmp_path / "ww"
    shared.mkdir()
    shared.chmod(mode)
    refused = pytest.raises(EnvironmentProblem, match=r"state directory .* writable by group")
    with refused:
        state.save(shared / "state.json", SAMPLE)
    with refused:
        state.load(shared / "state.json")
    assert list(shared.iterdir()) == []


def test_the_temp_file_never_follows_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even were the directory check bypassed, the temp name is unpredictable and
    opened O_EXCL|O_NOFOLLOW: a symlink at the old name (pid-based) is ignored."""
    victim = tmp_path / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    (d / f".state.json.tmp-{os.getpid()}").symlink_to(victim)
    state.save(d / "state.json", SAMPLE)
    assert victim.read_text() == "root's secret\n"
    assert not (d / "state.json").is_symlink() and state.load(d / "state.json") == SAMPLE
    monkeypatch.setattr(secrets, "token_hex", lambda _n: "fixed")
    (d / f".state.json.tmp-{os.getpid()}-fixed").symlink_to(victim)
    with pytest.raises(FileExistsError):
        state.save(d / "state.json", SAMPLE)
    assert victim.read_text() == "root's secret\n"

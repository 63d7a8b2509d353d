"""The agent's state file: versioned, atomic, refused clearly when unusable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from controlplane.agent import state
from controlplane.agent.state import AppliedState, StateError

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

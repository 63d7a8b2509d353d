"""What the agent applied, persisted so a restarted agent knows what it owns.

The file is versioned (``schema``). A newer agent reads older schemas through
:data:`_MIGRATIONS` (one step per version) or refuses them with a message that
says what to do; an older agent refuses a newer file rather than guess, since
writing back its own view would silently drop what the newer version recorded.

Writes are atomic: a temp file in the same directory, fsync, rename over the
old file, fsync the directory (so the rename itself survives a power cut).
A reader therefore sees either the previous state or the new one, never half.

Safe in a directory someone else could reach (issue 15, F11): the directory
must be ours and not writable by others (checked like the control socket's),
the temp file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` under an
unpredictable name (never opened through a planted symlink), and the state
file is read with ``O_NOFOLLOW|O_NONBLOCK`` as a regular file only (a FIFO
never blocks the start), its JSON bounded in depth and number size.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane import boundedjson
from controlplane.agent import private_dir
from controlplane.errors import EnvironmentProblem
from controlplane.regular_file import read_regular

SCHEMA_VERSION = 1
# Oldest schema this version can still read (through _MIGRATIONS).
OLDEST_READABLE = 1
DEFAULT_STATE_ROOT = Path("/var/lib/offloadctl")
MAX_STATE_BYTES = 4 << 20
MAX_STATE_DEPTH = 16  # the file is three levels deep

# schema N -> N+1 upgrades of the raw dictionary; empty while there is only v1.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class StateError(EnvironmentProblem):
    """The state file exists but cannot be used (exit 4: the operator decides)."""


def default_state_path(netns: str | None) -> Path:
    return DEFAULT_STATE_ROOT / (netns or "host") / "state.json"


@dataclass(frozen=True)
class AppliedState:
    """What the agent last committed, and what it therefore owns."""

    netns: str | None
    config_path: str
    config_sha256: str
    table_family: str
    table_name: str
    applied_at: float
    reuseport_groups: tuple[str, ...] = ()
    reuseport_bpffs: str = "/sys/fs/bpf"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "netns": self.netns,
            "config_path": self.config_path,
            "config_sha256": self.config_sha256,
            "table": {"family": self.table_family, "name": self.table_name},
            "applied_at": self.applied_at,
            "reuseport": {"bpffs": self.reuseport_bpffs, "groups": list(self.reuseport_groups)},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AppliedState:
        table = data["table"]
        rp = data.get("reuseport", {})
        return cls(
            netns=data["netns"],
            config_path=str(data["config_path"]),
            config_sha256=str(data["config_sha256"]),
            table_family=str(table["family"]),
            table_name=str(table["name"]),
            applied_at=float(data["applied_at"]),
            reuseport_groups=tuple(str(g) for g in rp.get("groups", [])),
            reuseport_bpffs=str(rp.get("bpffs", "/sys/fs/bpf")),
        )


def decode(raw: bytes, source: str) -> AppliedState:
    """Parse a state file's bytes; every failure names the file and what to do."""
    try:
        data = boundedjson.loads(raw, max_depth=MAX_STATE_DEPTH)
    except boundedjson.JsonRejected as exc:
        raise StateError(
            f"state file {source} is not valid JSON ({exc}); move it away to start afresh"
            " (the agent re-reads the kernel on start)"
        ) from None
    if not isinstance(data, dict):
        raise StateError(f"state file {source}: expected a JSON object; move it away")
    schema = data.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise StateError(f"state file {source}: no integer 'schema' field; move it away")
    if schema > SCHEMA_VERSION:
        raise StateError(
            f"state file {source} has schema {schema}, written by a newer offloadctl;"
            f" this version reads schemas {OLDEST_READABLE}..{SCHEMA_VERSION}."
            " Upgrade offloadctl, or move the file away to let this version start afresh"
        )
    if schema < OLDEST_READABLE:
        raise StateError(
            f"state file {source} has schema {schema}, too old for this version (reads"
            f" {OLDEST_READABLE}..{SCHEMA_VERSION}); move it away to start afresh"
        )
    while schema < SCHEMA_VERSION:
        data = _MIGRATIONS[schema](data)
        schema += 1
        data["schema"] = schema
    try:
        return AppliedState.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(
            f"state file {source}: schema {schema} but malformed ({type(exc).__name__}: {exc});"
            " move it away to start afresh"
        ) from None


def load(path: Path) -> AppliedState | None:
    """The recorded state, or None when there is no file yet. A state directory
    others can write is refused here, at the agent's start, before any apply."""
    if os.path.lexists(path.parent):
        private_dir.check(path.parent, "state directory", "--state-file")
    try:
        raw = read_regular(path, MAX_STATE_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise StateError(f"cannot read state file {path}: {why}; move it away") from None
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"state file {path} is larger than {MAX_STATE_BYTES} bytes; move it away")
    return decode(raw, str(path))


def check_dir(path: Path) -> None:
    """Create the state file's directory if missing; refuse it unless only we can
    write it."""
    private_dir.ensure(path.parent, "state directory", "--state-file")


def save(path: Path, state: AppliedState) -> None:
    """Write ``state`` atomically (temp + fsync + rename + fsync of the directory)."""
    directory = path.parent
    check_dir(path)
    payload = (json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n").encode()
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)

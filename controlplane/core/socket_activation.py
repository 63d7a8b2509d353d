"""systemd's socket-activation and notify protocols, as pure data.

- ``--listen [NAME=]ADDR:PORT`` parsed into a :class:`ListenSpec` (IPv6 in
  brackets: ``[::]:8080``);
- the environment a socket-activated CMD expects (``LISTEN_FDS`` listeners at
  fds 3, 4, …, ``LISTEN_PID``, ``LISTEN_FDNAMES``, ``NOTIFY_SOCKET``), see
  sd_listen_fds(3) and sd_notify(3);
- ``KEY=value`` notify datagrams, and the one-line message one ``exec``
  generation sends its predecessors.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controlplane.core.numbers import ascii_decimal
from controlplane.errors import ConfigError, ConfigIssue

__all__ = [
    "LISTEN_FDS_START",
    "MAX_DATAGRAM",
    "ListenSpec",
    "activation_env",
    "format_successor",
    "parse_notify",
    "parse_successor",
]

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
MAX_DATAGRAM = 4096  # notify messages are a few lines; longer ones are cut and ignored
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # fd names: no ':' (LISTEN_FDNAMES separator)
_SUCCESSOR_RE = re.compile(rb"^successor generation=(0|[1-9][0-9]{0,9})\n?$")


@dataclass(frozen=True)
class ListenSpec:
    host: str
    port: int
    family: int  # 4 or 6
    name: str = "listen"

    @classmethod
    def parse(cls, text: str, field: str = "--listen") -> ListenSpec:
        def bad(reason: str) -> ConfigError:
            return ConfigError([ConfigIssue(field, f"{text!r}: {reason}")])

        name, sep, rest = text.rpartition("=")
        if not sep:
            name = "listen"
        elif not _NAME_RE.fullmatch(name):
            raise bad("the name before '=' must be 1-64 of A-Z a-z 0-9 _ . -")
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
            if not sep:
                raise bad("expected [IPV6]:PORT")
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep:
                raise bad("expected ADDR:PORT (IPv6 as [ADDR]:PORT)")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IP address") from None
        if rest.startswith("[") != (ip.version == 6):
            raise bad("write IPv6 addresses in brackets, IPv4 without")
        port = ascii_decimal(port_text)
        if port is None or not 1 <= port <= 65535:
            raise bad(f"port {port_text!r} is not in 1..65535")
        return cls(str(ip), port, ip.version, name)

    def __str__(self) -> str:
        addr = f"[{self.host}]" if self.family == 6 else self.host
        return f"{self.name}={addr}:{self.port}"


def activation_env(
    base: Mapping[str, str],
    specs: Sequence[ListenSpec],
    *,
    pid: int,
    notify_socket: str,
    generation: int,
) -> dict[str, str]:
    """CMD's environment: ``base`` plus the socket-activation variables.

    ``pid`` is CMD's own pid (LISTEN_PID must match getpid() in CMD, so the
    caller sets it after fork); the outer NOTIFY_SOCKET is replaced by ours.
    """
    env = dict(base)
    env.update(
        LISTEN_FDS=str(len(specs)),
        LISTEN_PID=str(pid),
        LISTEN_FDNAMES=":".join(s.name for s in specs),
        NOTIFY_SOCKET=notify_socket,
        OFFLOADCTL_REUSEPORT_GENERATION=str(generation),
    )
    return env


def parse_notify(data: bytes) -> dict[str, str]:
    """``KEY=value`` lines of one sd_notify datagram; malformed lines are skipped."""
    out: dict[str, str] = {}
    if len(data) > MAX_DATAGRAM:
        return out
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key.isupper() and key.replace("_", "").isalnum():
            out[key] = value
    return out


def format_successor(generation: int) -> bytes:
    return f"successor generation={generation}\n".encode()


def parse_successor(data: bytes) -> int | None:
    m = _SUCCESSOR_RE.fullmatch(data)
    return int(m.group(1)) if m else None

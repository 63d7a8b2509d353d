"""The socket-activation data: --listen parsing, CMD's environment, notify datagrams."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core.socket_activation import (
    ListenSpec,
    activation_env,
    format_successor,
    parse_notify,
    parse_successor,
)
from controlplane.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("0.0.0.0:8080", ListenSpec("0.0.0.0", 8080, 4)),
        ("http=10.0.0.1:80", ListenSpec("10.0.0.1", 80, 4, "http")),
        ("[::]:443", ListenSpec("::", 443, 6)),
        ("tls=[2001:db8::1]:8443", ListenSpec("2001:db8::1", 8443, 6, "tls")),
    ],
)
def test_listen_specs(text: str, spec: ListenSpec) -> None:
    assert ListenSpec.parse(text) == spec
    assert ListenSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("8080", "expected ADDR:PORT"),
        ("localhost:80", "not an IP address"),
        ("::1:80", "IPv6 addresses in brackets"),
        ("[10.0.0.1]:80", "IPv6 addresses in brackets"),
        ("[::1]80", r"expected \[IPV6\]:PORT"),
        ("1.2.3.4:0", "not in 1..65535"),
        ("1.2.3.4:http", "not in 1..65535"),
        ("a:b=1.2.3.4:80", "name before '='"),
    ],
)
def test_bad_listen_specs_name_the_field_and_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as exc:
        ListenSpec.parse(text)
    assert exc.value.issues[0].path == "--listen"


def test_activation_env_replaces_the_outer_notify_socket() -> None:
    specs = [ListenSpec("0.0.0.0", 80, 4, "http"), ListenSpec("::", 80, 6, "http6")]
    env = activation_env(
        {"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify"},
        specs,
        pid=321,
        notify_socket="@ours",
        generation=5,
    )
    assert env == {
        "PATH": "/bin",
        "LISTEN_FDS": "2",
        "LISTEN_PID": "321",
        "LISTEN_FDNAMES": "http:http6",
        "NOTIFY_SOCKET": "@ours",
        "OFFLOADCTL_REUSEPORT_GENERATION": "5",
    }


def test_notify_datagrams() -> None:
    assert parse_notify(b"READY=1\nSTATUS=Gunicorn arbiter booted") == {
        "READY": "1",
        "STATUS": "Gunicorn arbiter booted",
    }
    assert parse_notify(b"garbage\n=x\nlower=1\nMAINPID=7\n") == {"MAINPID": "7"}
    assert parse_notify(b"READY=1" + b"x" * 5000) == {}


@given(st.binary(max_size=64))
def test_successor_messages_round_trip_and_reject_anything_else(data: bytes) -> None:
    assert parse_successor(format_successor(42)) == 42
    gen = parse_successor(data)
    assert gen is None or format_successor(gen) in (data, data + b"\n")

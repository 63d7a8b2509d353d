"""The bpf(2) wrapper's syscall numbers, per architecture, against the kernel's headers."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

from controlplane.errors import UnsupportedError
from controlplane.kernel.bpf import syscall

# The uapi headers (linux-libc-dev) hold the numbers for x86_64 and for every
# architecture on the generic table, aarch64 among them.
HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


def _header_number(header: Path, name: str) -> int:
    found = re.search(rf"^#define __NR_{name}\s+(\d+)$", header.read_text(), re.MULTILINE)
    assert found, f"{name} not in {header}"
    return int(found.group(1))


@pytest.mark.parametrize("machine", sorted(HEADERS))
@pytest.mark.parametrize(
    ("table", "name"), [(syscall._SYS_BPF, "bpf"), (syscall._SYS_PIDFD_GETFD, "pidfd_getfd")]
)
def test_numbers_match_the_kernel_headers(
    monkeypatch: pytest.MonkeyPatch, machine: str, table: dict[str, int], name: str
) -> None:
    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert syscall.syscall_number(table) == _header_number(header, name)


def test_unknown_architecture_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "sparc64")
    with pytest.raises(
        UnsupportedError, match=r"architecture 'sparc64' \(known: aarch64, x86_64\)"
    ):
        syscall.syscall_number(syscall._SYS_BPF)

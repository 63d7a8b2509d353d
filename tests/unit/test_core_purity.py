"""The core stays sans-IO: no kernel, socket or subprocess imports; service/ pumps
over ports and reaches the kernel only through them."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "controlplane"
FORBIDDEN = {"socket", "subprocess", "pyroute2", "nftables", "bcc", "ctypes", "controlplane.kernel"}
# service/ pumps over ports: the kernel's sockets, select and pipes are kernel/'s.
SERVICE_FORBIDDEN = {"socket", "select", "selectors", "subprocess", "pyroute2", "nftables", "bcc"}


def _forbidden_imports(folder: str, forbidden: set[str]) -> Iterator[str]:
    for path in (PACKAGE / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    yield f"{folder}/{path.name} imports {name}"


def test_core_imports_no_io() -> None:
    assert list(_forbidden_imports("core", FORBIDDEN)) == []


def test_services_reach_the_kernel_only_through_ports() -> None:
    assert list(_forbidden_imports("service", SERVICE_FORBIDDEN)) == []

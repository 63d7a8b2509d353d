"""The core stays sans-IO: no kernel, socket or subprocess imports."""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = {"socket", "subprocess", "pyroute2", "nftables", "bcc", "ctypes", "controlplane.kernel"}
CORE = Path(__file__).parents[2] / "controlplane" / "core"


def test_core_imports_no_io() -> None:
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), (
                    f"{path.name} imports {name}"
                )


SERVICE = Path(__file__).parents[2] / "controlplane" / "service"
# service/ pumps over ports: the kernel's sockets, select and pipes are kernel/'s.
SERVICE_FORBIDDEN = {"socket", "select", "selectors", "subprocess", "pyroute2", "nftables", "bcc"}


def test_services_reach_the_kernel_only_through_ports() -> None:
    for path in SERVICE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in SERVICE_FORBIDDEN), (
                    f"service/{path.name} imports {name}"
                )

"""Configs the benchmarks share, so their rows measure the same workload."""

from __future__ import annotations

from typing import Any


def port_forwards(rules: int) -> dict[str, Any]:
    """The ``nat:`` section of ``rules`` DNAT port forwards on wan0 plus masquerade."""
    return {
        "masquerade": [{"oifname": "wan0"}],
        "dnat": [
            {
                "iifname": "wan0",
                "port": 1024 + i,
                "to": f"10.0.{i // 250}.{i % 250 + 1}",
                "to_port": 80,
            }
            for i in range(rules)
        ],
    }

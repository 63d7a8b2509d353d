"""Kernel-offload control plane: nftables flowtables, reuseport migration, flow invalidation.

Layout: ``config`` parses input; ``core`` is pure (render, plan, policies);
``kernel`` holds the adapters that talk to the kernel; ``cli`` wires them up.
"""

__version__ = "0.1.0"

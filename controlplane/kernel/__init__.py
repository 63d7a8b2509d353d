"""Adapters to the kernel: the only package that imports nftables, pyroute2, bcc or
socket to talk to the kernel (netlink, BPF, ``select`` on their descriptors).

The pure core (``controlplane.core``) never imports from here, and the services
(``controlplane.service``) reach it only through the Protocols of
:mod:`controlplane.kernel.ports` (both checked by tests/unit/test_core_purity.py).
The agent's own sockets (control, sd_notify, metrics) are not kernel adapters.
"""

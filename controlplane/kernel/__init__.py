"""Adapters to the kernel: the only package that imports nftables, pyroute2, bcc or socket.

The pure core (``controlplane.core``) never imports from here.
"""

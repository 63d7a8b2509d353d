"""nftables: the libnftables adapter."""

"""Pure logic: no netlink, nft, bcc or socket imports (enforced by a unit test)."""

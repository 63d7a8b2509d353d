"""rtnetlink: links, neighbours, FDB, routes, VLAN devices."""

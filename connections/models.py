"""Who this node syncs with, and how: nodes, connections, rules versions and triggers."""

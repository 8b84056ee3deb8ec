"""HTTP routes, one small module per area; their dependencies (hub, roles, device) come from ``hub/api/deps.py``."""

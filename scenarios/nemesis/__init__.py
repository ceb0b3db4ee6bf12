"""Faults injected into runs, and the Mooncake master the harness owns (starts, stops, restarts)."""

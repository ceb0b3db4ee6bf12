"""cpcheck's harness: generate schedules, run them on N ranks, check that every rank agrees."""

__version__ = "0.1.0"

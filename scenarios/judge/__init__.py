"""Judging a run: cross-rank invariants, the protocol oracle, outcome coverage and the verdict."""

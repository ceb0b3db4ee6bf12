"""Generators: Hypothesis strategies, workload shaping and the named scenarios that make Schedules."""

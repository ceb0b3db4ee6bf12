"""SGLang's own HiCache (a real release, 0.5.9 .. 0.5.15.post1) as a second system under test.

envs (per-release CPU environments), shim (GPU-only imports), adapters (per-release API),
seams (gated events, IO gates, pacer), rank/driver/storage (the worker side), executor/cli/
matrix/differential (the harness side). Nothing here is imported by `reference/`.
"""

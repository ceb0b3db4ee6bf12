"""A small, faithful reference of SGLang's CP-synchronised HiCache: the system under test.

It imports nothing from `scenarios/` or `tests/`; the harness reaches it only through
`reference.api` (build one rank's cache) and the two seams `pacing` and `observer`. Which
SGLang release's agreement protocol it follows is a profile (`profiles.py`), chosen per run.
"""

__version__ = "0.1.0"

"""Where things are, in one place (every module that needs a path asks here)."""

from __future__ import annotations

from pathlib import Path

#: the `scenarios` package
PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: the repository (or source tree) the harness runs from
REPO_ROOT = PACKAGE_DIR.parent
#: named scenarios (TOML) and the replay corpus the suite reruns
CATALOG_DIR = PACKAGE_DIR / "catalog"
CORPUS_DIR = PACKAGE_DIR / "corpus"
#: one CPU environment per SGLang release (built by `python -m scenarios.sut.sglang.envs`)
SGLANG_ENVS_DIR = REPO_ROOT / "build" / "sglang-envs"

#: scheduler steps a run may take to drain after its ops (both SUTs): a run still busy then is
#: judged as it stands
DRAIN_STEPS = 400

#: tokens per page in every generated Schedule and soak chunk (the reference's default)
PAGE = 4
#: layouts a reference hunt draws from when none is given (any of them runs in-process)
EXPLORE_LAYOUTS = ("1x2", "2x2", "1x4", "2x1")
#: the smallest layouts with CP peers (one and two TP ranks): SGLang hunts, the release matrix
#: and the shaped prefetch workloads default to them (2 and 4 processes on a 2-core box)
CP_LAYOUTS = ("1x2", "2x2")
#: the smallest pipeline-parallel layout (two stages of one rank): the release matrix's PP
#: column, 2 processes (2x2x2 is 8, too many for a 2-core box per cell)
PP_LAYOUT = "1x1x2"
#: the release matrix's columns and its default layouts
MATRIX_LAYOUTS = (*CP_LAYOUTS, PP_LAYOUT)

"""Tables in docs/ are what their commands print from the committed inputs, never hand edits.

Each table sits between generated markers in its docs file (scenarios/store/doc_tables.py). Here it is
regenerated from the committed inputs and compared:
  release matrix  docs/sglang-matrix/cells.json -> docs/sglang-release-matrix.md
  profile table   docs/measurements/profile-table.json -> docs/measurements/profile-table.md
  detect table    docs/measurements/detect-table.json -> docs/measurements/detect-table.md
What cannot be checked from committed inputs: that a new measurement would give the same cells.
The matrix needs built SGLang environments and hours; the detect table's seconds depend on the
machine and its load. The profile table's cells are deterministic, so one cheap cell is rerun.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import bench_detect, profile_table
from reference.api import PROFILES, VARIANTS
from scenarios.store import matrix_cells, matrix_table
from scenarios.store.doc_tables import MarkerError, read_block, replace_block, write_block
from tests.subprocess_env import REPO

DOCS = REPO / "docs"
MATRIX_DOC, MATRIX_CELLS = DOCS / "sglang-release-matrix.md", DOCS / "sglang-matrix" / "cells.json"
PROFILE_DOC = DOCS / "measurements" / "profile-table.md"
PROFILE_CELLS = DOCS / "measurements" / "profile-table.json"
DETECT_DOC = DOCS / "measurements" / "detect-table.md"
DETECT_DATA = DOCS / "measurements" / "detect-table.json"


# -- the markers -----------------------------------------------------------------------------
def test_a_block_is_replaced_and_the_prose_around_it_kept() -> None:
    text = "# Title\n\nprose before\n"
    once = replace_block(text, "t", "| a |\n|---|\n| 1 |", "cmd --write x")
    assert once.startswith(text) and read_block(once, "t") == "| a |\n|---|\n| 1 |"
    edited = once + "\nprose after\n"
    twice = replace_block(edited, "t", "| a |\n|---|\n| 2 |", "cmd --write x")
    assert read_block(twice, "t").endswith("| 2 |")
    assert twice.startswith(text) and twice.endswith("\nprose after\n")
    assert replace_block(twice, "t", "| a |\n|---|\n| 2 |", "cmd --write x") == twice
    with pytest.raises(MarkerError, match="no BEGIN"):
        read_block(text, "t")
    with pytest.raises(MarkerError, match="unmatched"):
        read_block(once.replace("<!-- END GENERATED t -->", ""), "t")


def test_write_block_creates_the_file_with_its_title(tmp_path: Path) -> None:
    p = write_block(tmp_path / "sub" / "t.md", "t", "body", "cmd", title="A table")
    assert p.read_text().startswith("# A table\n") and read_block(p.read_text(), "t") == "body"


def _outside_begin(text: str) -> str:
    """The text with its BEGIN markers blanked (they name the --write target)."""
    return re.sub(r"^<!-- BEGIN GENERATED .*-->$", "<!-- BEGIN -->", text, flags=re.M)


def _hand_edit(text: str, name: str) -> str:
    body = read_block(text, name)
    return text.replace(body, body.replace("agree", "AGREE", 1).replace("5/5", "4/5", 1), 1)


# -- the release matrix ----------------------------------------------------------------------
def test_release_matrix_doc_is_the_cells_file_rendered(tmp_path: Path) -> None:
    committed = MATRIX_DOC.read_text()
    want = matrix_table.render(matrix_cells.merge(str(MATRIX_CELLS)))
    assert read_block(committed, matrix_table.TABLE) == want, \
        "regenerate: python -m scenarios.store.matrix_table docs/sglang-matrix/cells.json " \
        "--write docs/sglang-release-matrix.md"
    # the command itself rewrites the committed file to the same bytes, and undoes a hand edit
    copy = tmp_path / "matrix.md"
    copy.write_text(_hand_edit(committed, matrix_table.TABLE))
    assert read_block(copy.read_text(), matrix_table.TABLE) != want  # the edit is seen
    assert matrix_table.main([str(MATRIX_CELLS), "--write", str(copy)]) == 0
    assert _outside_begin(copy.read_text()) == _outside_begin(committed)
    assert "--write matrix.md" in copy.read_text()  # no machine path in the marker


# -- the profile table -----------------------------------------------------------------------
def test_profile_table_doc_is_its_cells_rendered(tmp_path: Path) -> None:
    cells = json.loads(PROFILE_CELLS.read_text())
    committed = PROFILE_DOC.read_text()
    assert read_block(committed, profile_table.TABLE) == profile_table.render_section(cells), \
        f"regenerate: {profile_table.COMMAND}"
    assert read_block(_hand_edit(committed, profile_table.TABLE), profile_table.TABLE) \
        != profile_table.render_section(cells)
    # the committed cells are a whole table: every profile x DP setting x layout, once
    got = sorted((c["protocol"], c["dp_attention"], c["layout"]) for c in cells)
    assert got == sorted((p, dp, lay) for p in PROFILES for dp in (True, False)
                         for lay in profile_table.LAYOUTS)
    assert all(c["verdict"] == "agree" or (c["invariant"] and c["ops"] > 0) for c in cells)


def test_one_profile_cell_reproduces() -> None:
    """Cells are deterministic (seed, budget, code): the cheapest diverging one is rerun."""
    from scenarios.campaigns.explore import hunt
    from scenarios.generate.strategies import for_sut
    from scenarios.sut.reference_executor import Executor

    cells = json.loads(PROFILE_CELLS.read_text())
    meta = cells[0]
    cell = min((c for c in cells if c["verdict"] == "diverge"), key=lambda c: c["seconds"])
    with Executor("inprocess", timeout_s=5.0) as ex:
        h = hunt(ex, for_sut("reference", (cell["layout"],), protocol=cell["protocol"],
                             dp_attention=cell["dp_attention"]), meta["budget"], meta["seed"])
    assert h.verdict is not None and h.found is not None, cell
    assert (h.verdict.invariant, h.steps) == (cell["invariant"], cell["ops"])


# -- the detect table ------------------------------------------------------------------------
def test_detect_table_doc_is_its_raw_numbers_rendered() -> None:
    data = json.loads(DETECT_DATA.read_text())
    committed = DETECT_DOC.read_text()
    assert read_block(committed, bench_detect.TABLE) == bench_detect.render_section(data), \
        f"regenerate: {bench_detect.COMMAND}"
    assert read_block(_hand_edit(committed, bench_detect.TABLE), bench_detect.TABLE) \
        != bench_detect.render_section(data)
    # every known-bad variant, oracle on and off, every seed the header claims
    rows = [(r["variant"], r["oracle"]) for r in data["rows"]]
    assert sorted(rows) == sorted((v, on) for v in VARIANTS if v != "fixed" for on in (True, False))
    assert all(len(r["seeds"]) == data["meta"]["seeds"] for r in data["rows"])


def test_the_benchmarks_write_through_the_same_markers(tmp_path: Path, monkeypatch) -> None:
    """--from-json --write rewrites a hand-edited copy back to the committed file."""
    import sys

    for module, doc, data in ((profile_table, PROFILE_DOC, PROFILE_CELLS),
                              (bench_detect, DETECT_DOC, DETECT_DATA)):
        copy = tmp_path / doc.name
        copy.write_text(_hand_edit(doc.read_text(), module.TABLE))
        assert copy.read_text() != doc.read_text()
        monkeypatch.setattr(sys, "argv", [module.__file__, "--from-json", str(data),
                                          "--write", str(copy)])
        module.main()
        assert copy.read_text() == doc.read_text(), module.__name__

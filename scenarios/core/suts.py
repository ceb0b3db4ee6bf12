"""The names of the systems under test, in one place: "reference", "sglang==VERSION" (a
release, run from its built environment) or "sglang@PATH" (a source tree: PATH is the directory
holding the `sglang` package, e.g. an SGLang checkout's `python/`)."""

from __future__ import annotations

import re

from scenarios.core.errors import UsageError

REFERENCE = "reference"
SGLANG_PREFIX = "sglang=="
SGLANG_TREE_PREFIX = "sglang@"
_RELEASE = re.compile(r"\d+\.\d+\.\d+(?:\.post\d+)?")
_FORMS = f"'{REFERENCE}', '{SGLANG_PREFIX}VERSION' or '{SGLANG_TREE_PREFIX}PATH'"


def sglang(version: str) -> str:
    """The SUT name of one SGLang release."""
    return f"{SGLANG_PREFIX}{version}"


def is_sglang(sut: str | None) -> bool:
    """Any SGLang: a release or a source tree."""
    return bool(sut) and (str(sut).startswith(SGLANG_PREFIX)
                          or str(sut).startswith(SGLANG_TREE_PREFIX))


def valid(sut: str) -> bool:
    if sut == REFERENCE:
        return True
    if sut.startswith(SGLANG_TREE_PREFIX):
        return bool(sut[len(SGLANG_TREE_PREFIX):].strip())
    return is_sglang(sut) and bool(_RELEASE.fullmatch(sut[len(SGLANG_PREFIX):]))


def check(sut: str) -> str:
    """`sut` if it is a well-formed name; a usage error naming the three forms otherwise."""
    if not valid(sut):
        raise UsageError(f"unknown system under test '{sut}': use {_FORMS} "
                         f"(e.g. {SGLANG_PREFIX}0.5.11, {SGLANG_TREE_PREFIX}python)")
    return sut


def sglang_tree(sut: str | None) -> str | None:
    """'sglang@PATH' -> 'PATH' (as given); anything else -> None."""
    if sut and sut.startswith(SGLANG_TREE_PREFIX) and valid(sut):
        return sut[len(SGLANG_TREE_PREFIX):]
    return None


def sglang_version(sut: str) -> str | None:
    """'reference' -> None; 'sglang==V' -> 'V'. A source tree has no release number here (its
    executor reads one from the tree): asking is a usage error, as is any unknown name. Callers
    that ask "is this SGLang?" use `is_sglang`."""
    if sut == REFERENCE:
        return None
    check(sut)
    if sut.startswith(SGLANG_TREE_PREFIX):
        raise UsageError(f"'{sut}' is an SGLang source tree, not a release: this command "
                         f"takes {SGLANG_PREFIX}VERSION")
    return sut[len(SGLANG_PREFIX):]

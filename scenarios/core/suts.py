"""The names of the systems under test, in one place: "reference" or "sglang==VERSION"."""

from __future__ import annotations

import re

from scenarios.core.errors import UsageError

REFERENCE = "reference"
SGLANG_PREFIX = "sglang=="
_RELEASE = re.compile(r"\d+\.\d+\.\d+(?:\.post\d+)?")


def sglang(version: str) -> str:
    """The SUT name of one SGLang release."""
    return f"{SGLANG_PREFIX}{version}"


def is_sglang(sut: str | None) -> bool:
    return bool(sut) and str(sut).startswith(SGLANG_PREFIX)


def valid(sut: str) -> bool:
    return sut == REFERENCE or (is_sglang(sut) and bool(_RELEASE.fullmatch(sut[len(SGLANG_PREFIX):])))


def sglang_version(sut: str) -> str | None:
    """'reference' -> None; 'sglang==V' -> 'V'. Anything else is a usage error."""
    if sut == REFERENCE:
        return None
    if not valid(sut):
        raise UsageError(f"unknown system under test '{sut}': use '{REFERENCE}' or "
                         f"'{SGLANG_PREFIX}VERSION' (e.g. {SGLANG_PREFIX}0.5.11)")
    return sut[len(SGLANG_PREFIX):]

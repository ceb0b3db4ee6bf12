"""`--protocol` and `--dp-attention`: which SGLang release's protocol, in which CP configuration.

Shared by `run`, `explore` and `soak`. Values are checked here, not by argparse, so a bad one is
one line naming the valid ones (exit 2). `replay` takes neither: the file says what ran.
"""

from __future__ import annotations

import argparse

from reference.api import (
    DEFAULT_PROFILE,
    DP_ATTENTION_CHOICES,
    PROFILES,
    UnknownProfileError,
    get_profile,
)
from scenarios.core.errors import UsageError


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", metavar="PROFILE",
                   help=f"SGLang release to model: {', '.join(PROFILES)} "
                        f"(default: the scenario's, else {DEFAULT_PROFILE})")
    p.add_argument("--dp-attention", metavar="on|off",
                   help="SGLang's --enable-dp-attention: on = the cache syncs over the attention-TP "
                        "group and CP peers share keys; off = the full TP group and global TP "
                        "ranks in MHA keys (default: the scenario's, else on)")


def protocol_changes(args: argparse.Namespace) -> dict:
    """Schedule fields the flags set (only the ones given); UsageError for a bad value."""
    changes: dict = {}
    protocol = getattr(args, "protocol", None)
    if protocol is not None:
        try:
            get_profile(protocol)  # the one check (reference/profiles.py), its one message
        except UnknownProfileError as e:
            raise UsageError(str(e)) from None
        changes["protocol"] = protocol
    dp = getattr(args, "dp_attention", None)
    if dp is not None:
        if dp not in DP_ATTENTION_CHOICES:
            raise UsageError(f"unknown --dp-attention '{dp}': choose one of "
                             f"{', '.join(DP_ATTENTION_CHOICES)}")
        changes["dp_attention"] = dp == "on"
    return changes

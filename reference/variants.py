"""Known-bad variants: small named switches that reproduce real bugs.

They exist so the harness can prove it catches each one. `fixed` is the profile's own
behaviour (reference/profiles.py). A variant is a switch read at the one place the bug lives,
never a copy of a module; each says which profiles it applies to (where the code it breaks
exists) and which class of real bug it models. An alias names a whole configuration instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from reference.profiles import PROFILES, ProtocolProfile, get_profile

ALL = tuple(PROFILES)


@dataclass(frozen=True)
class Variant:
    name: str
    bug: str
    bug_class: str
    profiles: tuple[str, ...] = ALL
    #: (profile, dp_attention) this name stands for; the run uses them whatever it was given
    alias_of: tuple[str, bool] | None = None


KNOWN: dict[str, Variant] = {v.name: v for v in (
    Variant("fixed", "the profile as released (no switch)", "none"),
    Variant("tp_only_sync",
            "alias: profile sglang-0.5.10 with DP attention (sync over the attention-TP group "
            "only, skipped when it has one rank; before #20460)",
            "agreement over a group that misses the ranks holding the same request (CP peers)",
            ("sglang-0.5.10",), alias_of=("sglang-0.5.10", True)),
    Variant("cp_rank_in_key", "attention-CP rank in the storage key suffix (mooncake_store on "
            "main before #20460; in no released wheel)",
            "rank-local data in a key that peers must share"),
    Variant("skip_ack_on_error", "prefetch IO thread emits no progress ack for a batch whose "
            "read failed", "a thread issues a different number of collectives than its peers "
            "after a local error", ("sglang-0.5.20",)),
    Variant("insert_local_completed", "prefetch termination agrees, then inserts the local "
            "token count", "acting on the local value after agreeing"),
    Variant("misaligned_batch", "prefetch IO writes batches after the first one page too far "
            "into host slots", "page transfer to the wrong host slots"),
    Variant("leak_on_revoke", "a revoked prefetch never returns its host slots",
            "resource leak on a rarely taken path"),
    Variant("writing_check_local_skip", "writing_check returns before its MIN when this rank "
            "has no finished write ack (a LOCAL test), while its peers issue the MIN",
            "collective skipped on an early return decided on local state: it mispairs with "
            "the next scheduler-thread collective on the shared gloo group",
            ("sglang-0.5.11", "sglang-0.5.13", "sglang-0.5.14", "sglang-0.5.20")),
)}

VARIANTS: dict[str, str] = {name: v.bug for name, v in KNOWN.items()}


class UnknownVariantError(ValueError):
    pass


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise UnknownVariantError(
            f"unknown variant '{name}': choose one of {', '.join(VARIANTS)}"
        )
    return name


def effective_configuration(protocol: str, dp_attention: bool, variant: str
                            ) -> tuple[ProtocolProfile, bool]:
    """The profile and DP-attention setting a run really uses (an alias overrides both)."""
    alias = KNOWN[check_variant(variant)].alias_of
    if alias is not None:
        protocol, dp_attention = alias
    return get_profile(protocol), dp_attention

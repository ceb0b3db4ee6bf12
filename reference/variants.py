"""Known-bad variants: small named switches that reproduce real bugs.

They exist so the harness can prove it catches each one. `fixed` is the behaviour after
SGLang PR #20460. A variant is a switch read at the one place the bug lives, never a copy of
a module.
"""

from __future__ import annotations

VARIANTS: dict[str, str] = {
    "fixed": "SGLang after PR #20460: sync over deduplicated attn-CP and attn-TP gloo groups",
    "tp_only_sync": "sync only over the TP group, skipped when it has one rank (before #20460)",
    "cp_rank_in_key": "attention-CP rank in the storage key suffix (mooncake_store before #20460)",
    "skip_ack_on_error": "prefetch IO thread emits no progress ack for a batch whose read failed",
    "insert_local_completed": "prefetch termination agrees, then inserts the local token count",
    "misaligned_batch": "prefetch IO writes batches after the first one page too far into host slots",
    "leak_on_revoke": "a revoked prefetch never returns its host slots",
}


class UnknownVariantError(ValueError):
    pass


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise UnknownVariantError(
            f"unknown variant '{name}': choose one of {', '.join(VARIANTS)}"
        )
    return name

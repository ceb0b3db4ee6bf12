"""Findings carry the rule that produced them; what reads them filters by rule, never by the
words of a message."""

from __future__ import annotations

from scenarios.core.verdict import Finding, Verdict
from scenarios.judge.checker import KEY_RULES


def test_a_finding_is_still_the_pair_it_prints_as() -> None:
    f = Finding("keys", "CP peers 0 and 1 use different keys", "keys.cp_peers_differ")
    inv, msg = f
    assert (inv, msg) == ("keys", "CP peers 0 and 1 use different keys") == f
    assert f.rule == "keys.cp_peers_differ" and f.invariant == "keys"
    assert Finding("tree", "x").rule == "tree"  # one rule per invariant elsewhere


def test_sglang_without_dp_attention_drops_key_findings_by_rule_not_by_words() -> None:
    from scenarios.sut.sglang.executor import KEYED_BY_GLOBAL_TP, annotate

    assert set(KEY_RULES) >= KEYED_BY_GLOBAL_TP
    # the words of a dropped rule on a kept rule, and a dropped rule without those words
    kept = Finding("keys", "CP peers: copies of page; SGLang names it", "keys.hash")
    dropped = Finding("keys", "something else entirely", "keys.cp_peers_share")
    v = annotate(Verdict(False, "keys", dropped[1], [dropped, kept], {}), False)
    assert v.failures == [kept] and v.invariant == "keys" and v.message == kept[1]
    v = annotate(Verdict(False, "keys", dropped[1], [dropped], {"ranks": 2}), False)
    assert v.ok
    # with DP attention every key finding stands
    v = annotate(Verdict(False, "keys", dropped[1], [dropped], {}), True)
    assert v.failures == [dropped]

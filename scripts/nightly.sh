#!/usr/bin/env bash
# The nightly, defined once: .github/workflows/nightly-soak.yml and `tox -e soak` both run this.
#   1. the soak-marked tests (long Hypothesis searches, soak replays);
#   2. a torchrun soak over a real Mooncake master with every fault on, a fresh seed each night
#      (printed and in report.json; SOAK_SEED pins it);
#   3. the release matrix of the newest SGLang on the package index next to the newest one
#      the committed matrix judged (`matrix --release newest --release newest-judged`); its
#      table is reported, a divergence in it is not the nightly's exit (a harness error is);
#   4. the mutation score of the fast detectors over reference/ (cosmic-ray, the `mutation`
#      extra), every target (hashing, sync, decisions: TARGETS in
#      scenarios/campaigns/mutation.py) one after the other: docs/measurements/mutation-score.md
#      regenerated, copied to $1 (MUTATION_MINUTES per target, 60; 0 skips it;
#      MUTATION_DIFF=VERSION adds the catalog's diff on that built release to the kill
#      command). Its result is reported, never the nightly's exit.
# Output (a run dir $1/TIMESTAMP-seedN with report.json, decisions_per_s.png, faults.png, ...,
# replay-*.json on a divergence; $1/latest points at it)
# goes to $1 (default soak-out). Exit: the soak's code (0 agree, 1 diverge, 125 cannot run
# here), or the tests' code when only they failed.
# Knobs (environment): SOAK_MINUTES (30) SOAK_LAYOUT (2x2; a comma list with SOAK_SHARD)
#   SOAK_BACKEND (mooncake) SOAK_MODE (torchrun) SOAK_DEVICE (auto: CUDA where present, one
#   GPU per rank) SOAK_FAULTS (all five) SOAK_SEED (unset: random) SOAK_TESTS (1; 0 skips
#   step 1) SOAK_DIFF (1; 0 skips the differential exploration, which runs with the soak
#   tests) SOAK_DIFF_EXAMPLES (100) SOAK_NEWEST (1; 0 skips the newest-release matrix, which
#   runs with the soak tests) SOAK_NEWEST_EXAMPLES (25) SOAK_SHARD (unset; I/N: this runner soaks part I of N, its own seed and layout
#   derived from SOAK_SEED and SOAK_LAYOUT, which every shard must share; the soak tests run
#   on shard 1 only) PYTHON (python3)
# A nightly spread over runners: each runs `SOAK_SHARD=I/N nightly.sh shard-I`, then
#   nightly.sh merge OUT DIR...   folds the shards' reports into OUT (one verdict, coverage
#                                 table and plots; every replay file kept); exit: its verdict
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "merge" ]; then
  shift
  [ "$#" -ge 2 ] || { echo "usage: $0 merge OUT DIR..." >&2; exit 2; }
  out="$1"
  shift
  exec "$py" -m scenarios.cli report merge "$@" --out "$out"
fi
out="${1:-soak-out}"
mkdir -p "$out"

shard_args=()
if [ -n "${SOAK_SHARD:-}" ]; then
  shard_args=(--shard "$SOAK_SHARD")
  [ "${SOAK_SHARD%%/*}" = "1" ] || SOAK_TESTS=0  # the soak tests once per nightly, not N times
fi

tests_rc=0
if [ "${SOAK_TESTS:-1}" = "1" ]; then
  "$py" -m pytest -p no:cacheprovider -q -m soak --junitxml="$out/soak-tests.xml"
  tests_rc=$?
  [ "$tests_rc" = 5 ] && tests_rc=0  # no soak-marked tests collected is not a failure
fi

# differential exploration on every built release (shard 1 only): the reference profile of
# each release against the release, 1x2 and 2x2; replay files of a difference go to $out/diff
diff_rc=0
if [ "${SOAK_TESTS:-1}" = "1" ] && [ "${SOAK_DIFF:-1}" = "1" ]; then
  for manifest in build/sglang-envs/*.json; do
    [ -e "$manifest" ] || continue
    v=$(basename "$manifest" .json)
    [ "$v" = "base" ] && continue
    for layout in 1x2 2x2; do
      "$py" -m scenarios.cli explore --differential --sut "sglang==$v" --layout "$layout" \
        --examples "${SOAK_DIFF_EXAMPLES:-100}" --replay-dir "$out/diff" 2>&1 \
        | tee -a "$out/differential.log"
      rc=${PIPESTATUS[0]}
      echo "nightly: differential $v $layout: exit $rc" | tee -a "$out/differential.log" >&2
      # 125: a release this machine cannot drive (0.5.23's Rust tree core): not a failure
      if [ "$rc" = 1 ] || { [ "$rc" != 0 ] && [ "$rc" != 125 ]; }; then diff_rc=$rc; fi
    done
  done
fi

# the newest release on the package index next to the newest one the committed matrix judged
# (shard 1): a release the adapters have never seen gets a run (125 only naming a missing seam),
# and a change between the two rows is the news; table in $out/newest.md, replays in $out/newest
newest_rc=0
if [ "${SOAK_TESTS:-1}" = "1" ] && [ "${SOAK_NEWEST:-1}" = "1" ]; then
  "$py" -m scenarios.sut.sglang.envs --newest > "$out/newest-env.log" 2>&1
  echo "nightly: building the newest release: exit $? (see $out/newest-env.log)" >&2
  "$py" -m scenarios.cli matrix --release newest --release newest-judged --layout 1x2 \
    --layout 2x2 --dp-attention both --examples "${SOAK_NEWEST_EXAMPLES:-25}" \
    --out "$out/newest" > "$out/newest.log" 2>&1
  newest_rc=$?
  "$py" -m scenarios.store.matrix_table "$out/newest/cells.json" --details > "$out/newest.md"
  cat "$out/newest.md" >&2
  echo "nightly: newest release vs newest judged: exit $newest_rc (see $out/newest.log)" >&2
fi

seed_args=()
[ -n "${SOAK_SEED:-}" ] && seed_args=(--seed "$SOAK_SEED")
"$py" -m scenarios.cli soak \
  --mode "${SOAK_MODE:-torchrun}" \
  --layout "${SOAK_LAYOUT:-2x2}" \
  --backend "${SOAK_BACKEND:-mooncake}" \
  --device "${SOAK_DEVICE:-auto}" \
  --minutes "${SOAK_MINUTES:-30}" \
  --faults "${SOAK_FAULTS:-slow_rank,storage_latency,storage_errors,master_restart,kill_rank}" \
  "${seed_args[@]}" "${shard_args[@]}" \
  --out "$out" 2>&1 | tee "$out/soak.log"
soak_rc=${PIPESTATUS[0]}
shard="${SOAK_SHARD:-1/1}"
if [ "${MUTATION_MINUTES:-60}" != "0" ] && [ "${shard%%/*}" = "1" ]; then
  "$py" -c "import cosmic_ray" 2>/dev/null || "$py" -m pip install -q -c constraints.txt cosmic-ray
  diff_args=()
  [ -n "${MUTATION_DIFF:-}" ] && diff_args=(--diff "$MUTATION_DIFF")
  "$py" -m scenarios.campaigns.mutation run --minutes "${MUTATION_MINUTES:-60}" \
    "${diff_args[@]}" > "$out/mutation.log" 2>&1 \
    && cp docs/measurements/mutation-score.md docs/measurements/mutation-results.json "$out/"
  echo "nightly: mutation run exit $? (see $out/mutation.log)" >&2
fi
echo "nightly: soak exit $soak_rc, soak tests exit $tests_rc, differential exit $diff_rc," \
  "newest exit $newest_rc; output in $out" >&2
if [ "$soak_rc" != 0 ]; then exit "$soak_rc"; fi
if [ "$tests_rc" != 0 ]; then exit "$tests_rc"; fi
if [ "$diff_rc" != 0 ]; then exit "$diff_rc"; fi
exit "$newest_rc"

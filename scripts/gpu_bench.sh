#!/usr/bin/env bash
# GPU numbers for issue 13, for the lead to run on a lent GPU host (the `device` tool).
#
# Here, once (downloads into .whl/, which .git/info/exclude ignores):
#     bash scripts/gpu_bench.sh fetch
# There (carry [".whl"], kind nvidia-h100-x4: one GPU per rank of a 2x2 layout), each stage
# well inside 10 minutes, results under $OUT (at most 8 files come back):
#     bash scripts/gpu_bench.sh all            # tests + soak + copies (~8 min)
#     bash scripts/gpu_bench.sh tests|soak|copies   # one stage per call if `all` runs long
# Stages:
#   tests   pytest -m cp, multi-rank tests with one GPU per rank      -> $OUT/cp-tests.txt
#   soak    torchrun 2x2 soak, --device cuda, Mooncake (non-CUDA build) with every fault,
#           SOAK_MINUTES (2) minutes                                    -> $OUT/soak-*.{json,png,txt}
#   copies  benchmarks/bench_copies.py: reference host<->device copies vs pinned copy_
#                                                                       -> $OUT/copies.md
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# what the GPU image lacks: pydantic (+ its deps) and Mooncake's non-CUDA build (the CUDA one
# is too large to carry), and the libibverbs Mooncake links even over TCP
WHEELS=(mooncake-transfer-engine-non-cuda==0.3.13.post1 pydantic==2.13.4 pydantic-core==2.46.4
        annotated-types==0.7.0 typing-inspection==0.4.2)
DEBS=(libibverbs1 libnl-3-200 libnl-route-3-200)

fetch() {
  ex="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' "$ex" 2>/dev/null || echo '/.whl/' >> "$ex"
  mkdir -p .whl/debs
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w" || exit 1
  done
  (cd .whl/debs && apt-get download "${DEBS[@]}") || exit 1
  du -sh .whl
}

setup() {
  if ! python3 -c 'import pydantic, mooncake.store' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "gpu_bench: wheel install failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! ldconfig -p | grep -q libibverbs.so.1; then  # unpack beside /, never into it
    for d in .whl/debs/*.deb; do dpkg-deb -x "$d" /tmp/ibv; done
    export LD_LIBRARY_PATH="/tmp/ibv/usr/lib/x86_64-linux-gnu:/tmp/ibv/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi -L | tee "$OUT/gpus.txt"
  python3 -c 'import torch, mooncake.store; print("torch", torch.__version__, "gpus", torch.cuda.device_count())' \
    | tee -a "$OUT/gpus.txt"
}

tests() {
  # 8 workers, one GPU or several (on one H200, 8 ran CUDA out of memory creating contexts
  # until executors bounded their live ranks; since then 145 passed in 218 s)
  timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -p no:cacheprovider -q -m cp -n "${TESTS_WORKERS:-8}" --timeout 300 2>&1 \
    | tail -40 > "$OUT/cp-tests.txt"
  tail -3 "$OUT/cp-tests.txt"
}

soak() {
  local tmp=/tmp/gpu-soak
  rm -rf "$tmp"
  MUTATION_MINUTES=0 SOAK_TESTS=0 SOAK_DEVICE=cuda SOAK_MINUTES="${SOAK_MINUTES:-2}" SOAK_LAYOUT=2x2 \
    timeout 400 bash scripts/nightly.sh "$tmp" > "$OUT/soak-log.txt" 2>&1
  echo "soak exit $?" | tee -a "$OUT/soak-log.txt"
  cp "$tmp/latest/report.json" "$OUT/soak-report.json" 2>/dev/null
  cp "$tmp/latest/faults.png" "$OUT/soak-faults.png" 2>/dev/null
  cp "$tmp"/latest/replay-*.json "$OUT/" 2>/dev/null
  grep -v '^[IWE][0-9]\{4\} ' "$OUT/soak-log.txt" | tail -4
}

# issue 15: eight ranks sharing the host's GPUs (rank r -> GPU r % n): the gloo floor at 2/4/8
# ranks, the generated budget per profile on 2x4, 4x2 and 2x2x2 under torchrun, a 2x4 soak
wide() {
  timeout 120 python3 benchmarks/bench_allreduce_floor.py --ranks 2 4 8 --iters 1000 \
    | tee "$OUT/allreduce-floor.md"
  : > "$OUT/wide-explore.txt"
  for layout in 2x4 4x2 2x2x2; do
    for p in sglang-0.5.10 sglang-0.5.11 sglang-0.5.13 sglang-0.5.20; do
      local t0=$SECONDS
      timeout "${WIDE_CELL_TIMEOUT:-100}" python3 -m scenarios.cli explore --mode torchrun --device cuda --layout "$layout" \
        --protocol "$p" --examples "${WIDE_EXAMPLES:-60}" --seed 0 --replay-dir /tmp/wide \
        > /tmp/wide.log 2>&1
      echo "$layout $p exit=$? $((SECONDS - t0))s $(grep -E 'DIVERGE|no divergence|UNKNOWN' /tmp/wide.log | head -1)" \
        | tee -a "$OUT/wide-explore.txt"
    done
  done
  local tmp=/tmp/wide-soak
  rm -rf "$tmp"
  MUTATION_MINUTES=0 SOAK_TESTS=0 SOAK_DEVICE=cuda SOAK_MINUTES="${WIDE_SOAK_MINUTES:-3}" SOAK_LAYOUT=2x4 \
    timeout 330 bash scripts/nightly.sh "$tmp" > "$OUT/wide-soak-log.txt" 2>&1
  echo "wide soak exit $?" | tee -a "$OUT/wide-soak-log.txt"
  cp "$tmp/latest/report.json" "$OUT/wide-soak-report.json" 2>/dev/null
  grep -v '^[IWE][0-9]\{4\} ' "$OUT/wide-soak-log.txt" | tail -4
}

copies() {
  timeout 120 python3 benchmarks/bench_copies.py --device cuda | tee "$OUT/copies.md"
}

case "${1:-all}" in
  fetch) fetch ;;
  tests) setup; tests ;;
  soak) setup; soak ;;
  copies) setup; copies ;;
  wide) setup; wide ;;
  all) setup; copies; soak; tests ;;
  *) echo "usage: $0 fetch|tests|soak|copies|wide|all" >&2; exit 2 ;;
esac

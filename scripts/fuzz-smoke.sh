#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a short while (default 30 s each;
# FERRY_FUZZ_SECS overrides) with libFuzzer's memory limit, and fails on the
# first crash, hang or out-of-memory. For a long run give a number of
# executions instead (FERRY_FUZZ_RUNS=10000000) and, for speed, no sanitizer
# (FERRY_FUZZ_SANITIZER=none; default address); FERRY_FUZZ_TARGETS picks
# targets (space-separated). Installs nightly and cargo-fuzz first
# if missing (scripts/install-fuzz.sh). Crashing inputs land in
# fuzz/artifacts/<target>/; replay one with
#   cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>
# The exec count of each run is printed ("Done N runs in S second(s)").
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-fuzz.sh
secs="${FERRY_FUZZ_SECS:-30}"
runs="${FERRY_FUZZ_RUNS:-}"
sanitizer="${FERRY_FUZZ_SANITIZER:-address}"
if [ -n "$runs" ]; then budget="-runs=$runs"; else budget="-max_total_time=$secs"; fi
cd fuzz
targets="${FERRY_FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
cargo +nightly fuzz build -s "$sanitizer"
for t in $targets; do
  echo "== fuzz $t: $budget, sanitizer $sanitizer"
  mkdir -p "corpus/$t"
  # The protocol's magics and numbers: without them libFuzzer rarely gets past the first check.
  case "$t" in
    nbd_*) dict=nbd.dict ;;
    hrl_*) dict=hrl.dict ;;
    *) dict="" ;;
  esac
  # -timeout: one input taking 10 s is a hang. The corpus grows across runs.
  # grep hides libFuzzer's progress lines; cargo fuzz's exit status is what counts.
  set +e
  cargo +nightly fuzz run -s "$sanitizer" "$t" -- "$budget" -rss_limit_mb=512 -timeout=10 ${dict:+-dict=$dict} 2>&1 \
    | grep -E '^(Done|==[0-9]+==|SUMMARY|thread|Test unit written)|panicked|ERROR|deadly signal'
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" -eq 0 ] || { echo "fuzz target $t failed (exit $status): see fuzz/artifacts/$t/"; exit 1; }
done

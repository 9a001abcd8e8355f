#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit, engine, end-to-end (ferryd + ferryctl
# + real NBD clients), simulator, doc tests and the README's commands; compiles
# the benchmarks; then runs every fuzz target for about 30 s
# (scripts/fuzz-smoke.sh). Installs what it needs first. Per-test timeouts:
# .config/nextest.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
# One build, kept lean on disk: no incremental caches (gigabytes for a tree
# built once), and the benchmarks compiled in the test profile, not release.
export CARGO_INCREMENTAL=0
# End-to-end tests start the real binaries: build them in the test profile first.
cargo build --workspace --bins --locked
# Benchmarks are never run here (minutes of 1 GiB I/O), but they must compile.
cargo test --workspace --benches --no-run --locked
cargo test --workspace --doc --locked
cargo nextest run --workspace --locked --no-fail-fast
# After the suite: parsers of untrusted bytes (NBD, HRL logs) under libFuzzer.
bash scripts/fuzz-smoke.sh

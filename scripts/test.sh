#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit, engine, end-to-end (ferryd + ferryctl
# + real NBD clients), simulator, and doc tests. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
# End-to-end tests start the real binaries: build them in the test profile first.
cargo build --workspace --bins --locked
cargo test --workspace --doc --locked
cargo nextest run --workspace --locked --no-fail-fast

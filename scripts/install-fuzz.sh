#!/usr/bin/env bash
# Installs what the fuzz targets (fuzz/) need, idempotently: a nightly
# toolchain (libFuzzer's sanitizer flags need it) and cargo-fuzz. Skips
# whatever is already there.
set -euo pipefail

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

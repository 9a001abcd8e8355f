#!/usr/bin/env bash
# Runs Ferry's side-by-side benchmarks (see benches/):
#   nbd_fio              fio over NBD: ferryd's export vs qemu-nbd
#   initial_replication  ferry protect -> Protected vs cp / zstd
#   resync               ferryctl resync after a 1% drift vs rsync --inplace
# Installs what they need first, idempotently: fio, libnbd-bin, qemu-utils,
# zstd, rsync (`apt-get update` once, and only when something is missing).
# Arguments select benches (default: all). Environment knobs are documented
# at the top of each bench file (FERRY_BENCH_DISK_MIB, FERRY_BENCH_SECS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/ensure-packages.sh
ensure_packages fio:fio nbdinfo:libnbd-bin qemu-nbd:qemu-utils qemu-img:qemu-utils zstd:zstd rsync:rsync
# fio's nbd engine lives in a plugin package on some distributions.
if ! fio --enghelp 2>/dev/null | grep -qw nbd && apt-cache show fio-plugin-nbd >/dev/null 2>&1; then
  ensure_packages fio-plugin-nbd-absent:fio-plugin-nbd  # no command to check: install the package
fi

benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(nbd_fio initial_replication resync kill9_restart)
for b in "${benches[@]}"; do
  echo "== cargo bench --bench $b"
  cargo bench --locked --bench "$b"
done

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

need=()
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
# fio's nbd engine lives in a plugin package on some distributions.
if command -v fio >/dev/null 2>&1 && ! fio --enghelp 2>/dev/null | grep -qw nbd; then
  apt-cache show fio-plugin-nbd >/dev/null 2>&1 && need+=(fio-plugin-nbd) || true
fi

if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "installing: ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(nbd_fio initial_replication resync)
for b in "${benches[@]}"; do
  echo "== cargo bench --bench $b"
  cargo bench --locked --bench "$b"
done

#!/usr/bin/env bash
# Installs what Ferry's tests need beyond the base image, idempotently:
# qemu-utils (qemu-io, qemu-img, qemu-nbd), fio (its nbd engine), libnbd-bin
# (nbdcopy, nbdinfo). Runs `apt-get update` once, and only when something is missing.
set -euo pipefail

need=()
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v nbdcopy >/dev/null 2>&1 || need+=(libnbd-bin)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)

if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "installing: ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

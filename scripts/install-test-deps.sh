#!/usr/bin/env bash
# Installs what Ferry's tests need beyond the base image, idempotently:
# qemu-utils (qemu-io, qemu-img, qemu-nbd), fio (its nbd engine), libnbd-bin
# (nbdcopy, nbdinfo); the blob store emulators Azurite and moto
# (install-blob-servers.sh); Python's grpcio with grpcio-reflection
# (install-grpc-clients.sh); openssl (test certificates). Runs `apt-get update` once, and only when something is missing.
set -euo pipefail
source "$(dirname "$0")/ensure-packages.sh"

ensure_packages qemu-io:qemu-utils qemu-img:qemu-utils fio:fio nbdcopy:libnbd-bin nbdinfo:libnbd-bin npm:npm openssl:openssl
bash "$(dirname "$0")/install-blob-servers.sh"
bash "$(dirname "$0")/install-grpc-clients.sh"

if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

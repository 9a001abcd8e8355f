#!/usr/bin/env bash
# Installs the blob store emulators the target tests run against, into a
# folder outside the checkout ($FERRY_TOOLS, default ~/.cache/ferry-tools),
# idempotently: Azurite (npm; 3.35.0, the last release that runs on
# Node.js 20) and moto's S3 server (PyPI, in a venv of its own). The tests
# start and stop the servers themselves (src/harness/blob_servers.rs) on
# 127.0.0.1 with free ports; they find them at
#   $FERRY_TOOLS/azurite/node_modules/.bin/azurite-blob
#   $FERRY_TOOLS/moto/bin/moto_server
set -euo pipefail

tools="${FERRY_TOOLS:-$HOME/.cache/ferry-tools}"
mkdir -p "$tools"
source "$(dirname "$0")/ensure-packages.sh"
ensure_packages npm:npm python3:python3

azurite_version=3.35.0
azurite="$tools/azurite/node_modules/.bin/azurite-blob"
if [ ! -x "$azurite" ] || ! grep -q "\"version\": \"$azurite_version\"" "$tools/azurite/node_modules/azurite/package.json" 2>/dev/null; then
  echo "installing azurite@$azurite_version into $tools/azurite"
  npm install --prefix "$tools/azurite" --no-audit --no-fund --loglevel=error "azurite@$azurite_version"
fi

moto_version=5.2.5
moto="$tools/moto/bin/moto_server"
if [ ! -x "$moto" ] || ! "$tools/moto/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
  echo "installing moto[server]==$moto_version into $tools/moto"
  python3 -m venv "$tools/moto"
  "$tools/moto/bin/pip" install -q "moto[server]==$moto_version"
fi

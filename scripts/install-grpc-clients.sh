#!/usr/bin/env bash
# Installs the generic gRPC client the API tests drive, idempotently:
# Python's grpcio with grpcio-reflection (PyPI), in a venv of its own under
# $FERRY_TOOLS (default ~/.cache/ferry-tools)/grpc. tests/clients/ holds
# the client; it finds ferryd's services by server reflection v1alpha, as
# grpcio-reflection, Postman and older grpcurl do.
set -euo pipefail

tools="${FERRY_TOOLS:-$HOME/.cache/ferry-tools}"
mkdir -p "$tools"
source "$(dirname "$0")/ensure-packages.sh"
ensure_packages python3:python3

grpcio_version=1.68.1
venv="$tools/grpc"
if ! "$venv/bin/python" -c "import grpc, grpc_reflection, sys; sys.exit(grpc.__version__ != '$grpcio_version')" 2>/dev/null; then
  echo "installing grpcio==$grpcio_version and grpcio-reflection into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio==$grpcio_version" "grpcio-reflection==$grpcio_version"
fi

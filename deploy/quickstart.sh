#!/usr/bin/env bash
# Runs Outrider on the embedded quickstart config with three demo instances behind it.
# Installs the build's only system dependency first when missing: protoc and its well-known
# .proto files (the etcd client's build step needs them), from Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
exec cargo run --release --locked -- demo

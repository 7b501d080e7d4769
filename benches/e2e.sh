#!/usr/bin/env bash
# Rough end-to-end HTTP/1.1 keep-alive throughput: wrk → Outrider → nginx, against wrk → nginx
# directly, in the same run. Outrider is pinned to core 0; nginx and wrk share core 1.
# Usage: benches/e2e.sh [seconds]   (installs nginx-light and wrk from Debian when missing)
#        EXTRA_YAML='tracing: {...}' benches/e2e.sh 10   appends top-level config to Outrider's
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
cargo build --release --locked -q

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait; nginx -p "$work" -c nginx.conf -s stop 2>/dev/null; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=$(free_port); front=$(free_port); admin=$(free_port)

cat > "$work/nginx.conf" <<NGINX
worker_processes 1; daemon on; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend; location / { return 200 "hello\n"; } } }
NGINX
taskset -c 1 nginx -p "$work" -c nginx.conf

cat > "$work/outrider.yaml" <<YAML
admin: { bind: 127.0.0.1:$admin }
listeners: [{ name: bench, bind: 127.0.0.1:$front, service: backend }]
services: { backend: { endpoints: [{ addr: 127.0.0.1:$backend }] } }
${EXTRA_YAML:-}
YAML
RUST_LOG=warn taskset -c 0 target/release/outrider run --config "$work/outrider.yaml" &
until curl -sf "http://127.0.0.1:$admin/ready" >/dev/null; do sleep 0.05; done

rps() { taskset -c 1 wrk -t1 -c50 -d"${secs}s" "$1" | awk '/Requests\/sec/ {print $2}'; }
direct=$(rps "http://127.0.0.1:$backend/")
proxied=$(rps "http://127.0.0.1:$front/")
echo "machine: $(nproc) cores, $(uname -m); wrk -t1 -c50 -d${secs}s; Outrider pinned to 1 core"
echo "direct to nginx:     $direct req/s"
echo "through Outrider:    $proxied req/s"
python3 -c "print(f'ratio proxied/direct: {$proxied/$direct:.2f}')"

#!/usr/bin/env bash
# The main job: build examples/hello, boot it as a microVM with a port forward, fetch its
# page through the forwarded port, print it, and stop the VM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT="${PORT:-8080}"
MVMCTL=.venv/bin/mvmctl
trap '$MVMCTL down hello >/dev/null 2>&1 || true' EXIT
$MVMCTL build examples/hello
$MVMCTL up examples/hello -p "$PORT:8080" --wait --timeout 120
echo "--- GET http://127.0.0.1:$PORT/"
curl -sS --fail "http://127.0.0.1:$PORT/"
$MVMCTL ls
$MVMCTL down hello
trap - EXIT

#!/usr/bin/env bash
# Runs the whole test suite: unit tests and end-to-end tests that boot real VMs under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

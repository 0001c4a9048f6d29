#!/usr/bin/env bash
# Runs the fault-injection suite (the host's faults, then a hostile guest and a long life) and
# regenerates docs/reliability.md from its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
MVM_RELIABILITY_REPORT="$PWD/docs/reliability.md" .venv/bin/python -m pytest tests/e2e/test_faults.py tests/e2e/test_hostile.py -q "$@"
echo "wrote docs/reliability.md"

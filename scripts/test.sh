#!/usr/bin/env bash
# Set up (idempotent), then run the test suite on CPU with 8 simulated devices available.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 tests "$@"

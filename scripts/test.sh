#!/usr/bin/env bash
# Set up (idempotent), then run the test suite on CPU with 8 simulated devices available.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The PyTorch cross-checks (exported models run by PyTorch itself) need .venv-torch. It is set up
# where PyTorch's CPU wheel lies on disk (this project's machines: seconds) or when asked with
# FASTADV_TORCH_TESTS=1 (elsewhere pip may download several GB); otherwise those tests skip.
want_torch=${FASTADV_TORCH_TESTS:-auto}
if [ "$want_torch" = 1 ] || { [ "$want_torch" = auto ] && ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; }; then
  bash scripts/setup_bench.sh || echo "[test] no PyTorch environment: its cross-checks skip" >&2
fi
exec .venv/bin/python -m pytest -q -n 2 tests "$@"

#!/usr/bin/env bash
# Set up (idempotent), then run the test suite on CPU with 8 simulated devices available.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The PyTorch cross-checks (models and attacks run by PyTorch itself) use .venv-torch: they run
# when it exists, FASTADV_TORCH_TESTS=1 sets it up first (scripts/setup_bench.sh; on a machine
# without a local CPU build of torch, pip downloads PyPI's, several GB), FASTADV_TORCH_TESTS=0
# skips them. The line below says which.
want_torch=${FASTADV_TORCH_TESTS:-auto}
case "$want_torch" in
  1) bash scripts/setup_bench.sh ;;
  0) export FASTADV_NO_TORCH=1 ;;
  auto) ;;
  *) echo "[test] error: FASTADV_TORCH_TESTS must be 0 or 1, got '$want_torch'" >&2; exit 2 ;;
esac
if [ -z "${FASTADV_NO_TORCH:-}" ] && torch=$(.venv-torch/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "[test] PyTorch cross-checks: run (.venv-torch, torch $torch)"
else
  echo "[test] PyTorch cross-checks: skipped (no .venv-torch; FASTADV_TORCH_TESTS=1 sets it up)"
fi
exec .venv/bin/python -m pytest -q -n 2 --dist worksteal tests "$@"

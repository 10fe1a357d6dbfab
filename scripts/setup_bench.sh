#!/usr/bin/env bash
# Optional: a separate environment (.venv-torch) for the PyTorch baseline of the benchmark, the
# PyTorch AutoAttack of experiments/autoattack_vs_torch.py and the PyTorch cross-checks in tests/.
# On these machines `pip install torch==2.13.0` under Python 3.11 takes a local CPU build; elsewhere
# set TORCH_SPEC (e.g. "torch" for the registry's CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x .venv-torch/bin/python ]; then
  PY=""
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.11*/bin/python3 python3.11 python3; do
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 9) else 1)' 2>/dev/null; then
      PY=$c; break
    fi
  done
  [ -n "$PY" ] || { echo "[setup_bench] no Python found" >&2; exit 1; }
  "$PY" -m venv .venv-torch
fi
.venv-torch/bin/python -c 'import torch' 2>/dev/null || \
  .venv-torch/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" \
      2> >(grep -v "^WARNING: Location '" >&2)
# The rest at the locked versions (requirements/torch.txt, scripts/lock.sh); then the independent
# AutoAttack of experiments/autoattack_vs_torch.py, by exact version and --no-deps: its declared
# torchvision dependency is not needed by the attacks and does not import beside a local torch.
stamp=.venv-torch/.fastadv_installed
want="$(sha256sum < requirements/torch.txt | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv-torch/bin/python -m pip install -q --require-hashes --no-deps -r requirements/torch.txt \
      2> >(grep -v "^WARNING: Location '" >&2)
  .venv-torch/bin/python -m pip install -q --no-deps "torchattacks==3.5.1" \
      2> >(grep -v "^WARNING: Location '" >&2)
  echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Idempotent set-up: Debian's Fashion-MNIST files, a virtualenv at .venv/ and the package.
# Safe to run twice; every step is skipped when already done.
#   FASTADV_EXTRAS=gpu   installs requirements/gpu.txt (jax[cuda12], NVIDIA);
#   FASTADV_EXTRAS=tpu   installs requirements/tpu.txt (jax[tpu]). The default: requirements/cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. Real Fashion-MNIST, offline, from Debian (the only real dataset reachable here).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] warning: no apt-get; Fashion-MNIST must be prepared by other means" >&2
  fi
fi

# 2. A Python >= 3.12 (the lock is resolved for 3.12; jax >= 0.11 needs it), 3.12 first.
pick_python() {
  local c
  local candidates=("${PYTHON:-}")
  if command -v pyenv >/dev/null 2>&1 || [ -d "${PYENV_ROOT:-$HOME/.pyenv}" ]; then
    for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python3; do candidates+=("$c"); done
  fi
  candidates+=(python3.13 python3.12 python3 python)
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}
# The lock to install (requirements/*.txt, exact versions and hashes: see scripts/lock.sh). A
# .venv installed from another lock (or setup.py) is replaced whole, so that nothing of the
# previous one stays behind.
case "${FASTADV_EXTRAS:-}" in
  "") lock=requirements/cpu.txt ;;
  gpu|tpu) lock=requirements/$FASTADV_EXTRAS.txt ;;
  *) echo "[setup] error: FASTADV_EXTRAS must be gpu or tpu, got '$FASTADV_EXTRAS'" >&2; exit 2 ;;
esac
stamp=.venv/.fastadv_installed
want="$(cat setup.py "$lock" | sha256sum | cut -c1-16) $lock"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] the lock changed: a new .venv"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  PY=$(pick_python) || { echo "[setup] error: need Python >= 3.12 (pyenv install 3.12, or PYTHON=...)" >&2; exit 1; }
  echo "[setup] creating .venv with $($PY --version 2>&1) ($PY)"
  "$PY" -m venv .venv
fi

# 3. The locked dependencies, then the package itself; re-run only when setup.py or the lock
#    changed. (pip's notices about local index folders that a machine's pip.conf names and that
#    do not exist are dropped; errors still show.)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $lock and fastadv_jax into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --require-hashes --no-deps -r "$lock" \
      2> >(grep -v "^WARNING: Location '" >&2)
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . \
      2> >(grep -v "^WARNING: Location '" >&2)
  echo "$want" > "$stamp"
fi

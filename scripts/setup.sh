#!/usr/bin/env bash
# Idempotent set-up: Debian's Fashion-MNIST files, a virtualenv at .venv/ and the package.
# Safe to run twice; every step is skipped when already done.
#   FASTADV_EXTRAS=gpu   installs jax[cuda12] (NVIDIA); FASTADV_EXTRAS=tpu installs jax[tpu].
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

# 2. A Python >= 3.11, preferring 3.12+ (the newest jax needs it).
pick_python() {
  local c
  local candidates=("${PYTHON:-}")
  if command -v pyenv >/dev/null 2>&1 || [ -d "${PYENV_ROOT:-$HOME/.pyenv}" ]; then
    for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python3; do candidates+=("$c"); done
  fi
  candidates+=(python3.13 python3.12 python3 python)
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}
if [ ! -x .venv/bin/python ]; then
  PY=$(pick_python) || { echo "[setup] error: need Python >= 3.11" >&2; exit 1; }
  echo "[setup] creating .venv with $($PY --version 2>&1) ($PY)"
  "$PY" -m venv .venv
fi

# 3. The package and its dependencies (re-run only when setup.py changed).
stamp=.venv/.fastadv_installed
extras="test${FASTADV_EXTRAS:+,$FASTADV_EXTRAS}"
want="$(cat setup.py | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing fastadv_jax[$extras] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi

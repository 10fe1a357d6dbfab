#!/usr/bin/env bash
# Set up (idempotent), then run the default job: FGSM + GradAlign on Fashion-MNIST.
# Extra arguments go to fastadv_jax.main, e.g. --config.num_epochs=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m fastadv_jax.main --config=configs/default.py --workdir="${WORKDIR:-runs/default}" "$@"

#!/usr/bin/env bash
# Upgrades the locked environment on purpose, in one command:
#   1. requirements/*.txt re-resolved to the newest versions setup.py's ranges allow
#      (scripts/lock.sh --upgrade; requirements/pins.txt follows them);
#   2. a new .venv from the new lock (scripts/setup.sh);
#   3. the default job in a fresh workdir, and the test suite;
#   4. the README's measured block (between its 'measured:default' markers) rewritten with that
#      run's numbers and the new versions (scripts/readme_measured.py).
# Then review `git diff` (a moved number is a changed jaxlib's rounding or a regression: the
# suite says which) and commit requirements/ and README.md together.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lock.sh --upgrade
bash scripts/setup.sh
wd="$(mktemp -d)/default"
WORKDIR="$wd" bash scripts/train.sh
bash scripts/test.sh
.venv/bin/python scripts/readme_measured.py "$wd" README.md
echo "[upgrade] done: review git diff requirements/ README.md"

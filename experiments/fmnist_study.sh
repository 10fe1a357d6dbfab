#!/usr/bin/env bash
# The fast-AT method study on real Fashion-MNIST (EXPERIMENTS.md, "Every method"): PGD-50-10 vs
# eps for every method on the paper's single-layer CNN and the small CNN, 3 seeds, two pinned
# single-threaded workers. Resumable: run it again after an interruption. Usage:
#   bash experiments/fmnist_study.sh [cnn|small|all]   (default all; cnn first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
METHODS=fgsm,fgsm_rs,gradalign,free,pgd10,nfgsm,zerograd,multigrad,elle,elle_a,gat,nuat
what=${1:-all}
if [ "$what" = cnn ] || [ "$what" = all ]; then
  $PY experiments/sweep.py --config=configs/fashion_mnist.py --methods=$METHODS --eps=16,48,64 \
      --seeds=0,1,2 --root=runs/study_cnn --workers=2 \
      --extra=model=cnn,n_filters=4,n_layers=1,optimizer=adam,lr_max=0.003
fi
if [ "$what" = small ] || [ "$what" = all ]; then
  $PY experiments/sweep.py --config=configs/fashion_mnist.py --methods=$METHODS --eps=64 \
      --seeds=0,1,2 --root=runs/study_small --workers=2
fi
for root in runs/study_cnn runs/study_small; do
  [ -d $root ] && $PY experiments/aggregate.py --root=$root || true
done

#!/usr/bin/env bash
# Every method under the 2024-26 protocol on real Fashion-MNIST (EXPERIMENTS.md, "The 2024-26
# protocol on Fashion-MNIST"): configs/fmnist_protocol.py (label smoothing 0.4, weight
# averaging, validation selection) on the paper's single-layer CNN at eps 48/255, seeds 0-2
# (seed-major: a study cut short has every method at the seeds it reached). Two stages, both
# resumable (run the script again after an interruption):
#   1. training, with PGD-50-10 on the first 1000 test points for the last raw, the last
#      averaged and the selected weights (results.json);
#   2. AutoAttack (standard) on the same 1000 points for the selected weights, seed by seed,
#      then for the last raw weights of every run (`fastadv_jax.evaluate`, one JSON file per
#      weights in each workdir).
# Then the table: experiments/protocol_table.py. Usage: bash experiments/fmnist_protocol_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ROOT=${ROOT:-runs/protocol_cnn}
SEEDS=${SEEDS:-0,1,2}
NEW=fgsm_pgi,fgsm_pco,liet,fgsm_uap,fgsm_cuap,fgsm_fuap,n_aaer,trades,pgd_at
OLD=fgsm,fgsm_rs,gradalign,free,pgd10,nfgsm,zerograd,multigrad,elle,elle_a,gat,nuat
EXTRA=model=cnn,n_filters=4,n_layers=1,optimizer=adam,lr_max=0.003,final_attack=pgd
autoattack() {  # $1: weights, $2: runs; two single-threaded evaluations at a time
  for wd in $2; do
    [ -f "$wd/results.json" ] || continue
    ls "$wd"/eval_$1_*aa-standard*.json >/dev/null 2>&1 && continue
    echo "$wd"
  done | XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      xargs -r -P 2 -I{} sh -c "$PY -m fastadv_jax.evaluate --workdir={} --weights=$1 \
      --attack=autoattack --n_eval=1000 >> {}/log.txt 2>&1 && echo '[autoattack $1] {}'"
}
for seed in ${SEEDS//,/ }; do
  $PY experiments/sweep.py --config=configs/fmnist_protocol.py --methods=$NEW,$OLD --eps=48 \
      --seeds=$seed --root=$ROOT --workers=2 --extra=$EXTRA || true
  autoattack selected "$ROOT/*_s$seed"
done
autoattack last "$ROOT/*"  # the last raw weights: the same runs without weight averaging
$PY experiments/protocol_table.py --root=$ROOT

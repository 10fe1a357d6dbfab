"""Fashion-MNIST under the 2024-26 fast-AT protocol: the CPU-sized study of every method with
label smoothing, weight averaging and validation selection (EXPERIMENTS.md, "The 2024-26
protocol on Fashion-MNIST").

Command (argument: a method preset, then optional eps in 1/255 and other fields):
  python -m fastadv_jax.main --config=configs/fmnist_protocol.py:fgsm_pgi,eps=48,seed=0 \
      --workdir=runs/protocol/fgsm_pgi_eps48_s0
  (`bash experiments/fmnist_protocol_study.sh` runs the whole grid.)

The study's setting (configs/fashion_mnist.py: one epoch, eps ramped over its first quarter,
diagnostics every 50 iterations) with the benchmark's protocol (configs/fastat_benchmark.py):
label smoothing 0.4 in the training loss and attack, the last 1000 training images held out for
validation, and at every diagnostic the raw or the averaged weights kept by validation PGD-10.
One epoch is 460 iterations, so the benchmark's tau = 0.9995 (a horizon of 2000 iterations)
would average mostly the initial weights; the average here follows DeepMind's warm-up rule,
tau_t = min(0.995, (1 + t) / (10 + t)), which averages over about the last tenth of the
iterations done. The final evaluation attacks the first 1000 test points with PGD-50-10 and
AutoAttack (standard) for the last raw, the last averaged and the selected weights.
Expected results and run times: EXPERIMENTS.md (measured on this project's 2-core CPU).
"""
import ml_collections

from fastadv_jax.configs import common, default, fashion_mnist, fastat_benchmark

TRAIN_IMAGES = 60_000


def get_config(arg: str = "fgsm_pgi,eps=48") -> ml_collections.ConfigDict:
  preset, kv = common.parse_arg(arg)
  c = default.get_config()
  fashion_mnist.study_setting(c)
  fastat_benchmark.protocol(c, TRAIN_IMAGES, validation=1000)
  c.eval_every = 50                 # selection as often as the study's diagnostics
  c.ema_decay, c.ema_warmup = 0.995, True
  c.eps = 48 / 255
  c.n_final_eval = 1000
  c.final_attack = "pgd,autoattack"
  common.apply_preset(c, preset)
  fashion_mnist.method_setting(c, preset)
  fastat_benchmark.per_method(c, preset)
  return common.finish(c, preset, kv, lambda eps: 1.0)

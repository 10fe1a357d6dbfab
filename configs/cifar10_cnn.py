"""CIFAR-10, the single-layer CNN with few filters (paper Section 4; docs/algorithms.md §3).

Command:
  python -m fastadv_jax.main --config=configs/cifar10_cnn.py:fgsm,eps=10 --workdir=runs/cnn/fgsm
  (n_filters=4 and n_layers=1 by default; e.g. configs/cifar10_cnn.py:gradalign,eps=10,n_filters=1)

Settings: FGSM from zero, eps 10/255, Adam with lr_max 0.003 on the cyclic schedule, weight
decay 5e-4, 30 epochs, diagnostics every 50 iterations; GradAlign's lambda 0.2.
Expected (paper): catastrophic overfitting around epoch 6 - PGD accuracy ~17-19 % before, ~0 after,
while FGSM accuracy jumps to ~45 %; gradient alignment drops with it.
Run time on one modern GPU: not measured in this project yet (no GPU was available).
"""
from fastadv_jax.configs import common, default


def get_config(arg: str = "fgsm,eps=10"):
  preset, kv = common.parse_arg(arg)
  c = default.get_config()
  c.dataset, c.crop_padding, c.flip = "cifar10", 4, True
  c.model = "cnn"
  c.model_args.cnn.n_layers, c.model_args.cnn.n_filters = 1, 4
  c.optimizer, c.lr_max, c.lr_schedule = "adam", 0.003, "cyclic"
  c.num_epochs = 30
  c.eps = 10 / 255
  c.eval_every = 50
  common.apply_preset(c, preset)
  return common.finish(c, preset, kv, lambda eps: 0.2)

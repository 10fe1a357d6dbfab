"""CIFAR-10, PreAct ResNet-18: the paper's Figure 1 / Table 4 runs (docs/algorithms.md §3, §5).

Command (argument: method, then optional eps in 1/255 and other fields):
  python -m fastadv_jax.main --config=configs/cifar10.py:gradalign,eps=8 --workdir=runs/c10/ga_8_s0
  methods: any name in fastadv_jax.methods.PRESETS (docs/methods.md), e.g. fgsm_rs, pgd10
  e.g. configs/cifar10.py:fgsm_rs,eps=16,seed=1

Expected (paper, mean of 5 seeds, PGD-50-10 on the first 1000 test points, last epoch):
  eps 8/255:  FGSM ~85.3 / ~0; FGSM-RS ~84.6 / ~45.1; Free-AT ~78.0 / ~45.9; PGD-2 ~82.3 / ~48.4;
              GradAlign 81.00 / 47.58; PGD-10 81.88 / 50.04  (clean / robust %)
  eps 16/255: FGSM, FGSM-RS and Free-AT collapse to 0 robust; PGD-2 ~9.9; GradAlign 28.88;
              PGD-10 ~33.5
Run time on one modern GPU: not measured in this project yet (no GPU was available; BENCHMARKS.md
gives the measured step times from which it follows).
Needs the CIFAR-10 TFDS files (docs/devices.md).
"""
from fastadv_jax.configs import common, default
from fastadv_jax.training import schedules


def get_config(arg: str = "gradalign,eps=8"):
  preset, kv = common.parse_arg(arg)
  c = default.get_config()
  c.dataset, c.crop_padding, c.flip = "cifar10", 4, True
  c.model = "preact_resnet18"
  c.half_precision = True
  c.optimizer, c.lr_schedule, c.weight_decay, c.momentum = "sgd", "cyclic", 5e-4, 0.9
  c.batch_size = 128
  c.num_epochs = 30
  c.eps = 8 / 255
  c.n_final_eval = 1000
  common.apply_preset(c, preset)
  c.lr_max = 0.30 if preset == "gradalign" else 0.2
  if preset == "free":
    c.num_epochs, c.lr_max, c.method_args.free.replay = 96, 0.04, 8
  return common.finish(c, preset, kv, lambda eps: schedules.grad_align_lambda(eps, "cifar10"))

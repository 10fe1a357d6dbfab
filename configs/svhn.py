"""SVHN, PreAct ResNet-18: the paper's SVHN runs (Table 5; docs/algorithms.md §3).

Command:
  python -m fastadv_jax.main --config=configs/svhn.py:gradalign,eps=8 --workdir=runs/svhn/ga_8_s0
  methods as configs/cifar10.py; eps 1..12 (in 1/255)

Settings: 15 epochs, lr_max 0.05 for every method (Free-AT: 45 epochs, lr 0.01), random crop
without flip, eps (and so the FGSM step) ramped linearly over the first 5 epochs, lambda(eps) =
1.5625 * 1.6**(eps/8). The GradAlign authors ramp PGD's eps, but for the FGSM family only the
step factor (0 -> 1.25, with the ball and the noise at full eps), and over 5 epochs for every
method; here eps itself ramps (so the step with it), over 15 of Free-AT's 45 epochs.
Expected (paper, eps 8/255, clean / PGD-50-10): GradAlign ~92.4 / ~42.2, PGD-10 ~91.8 / ~52.2.
Run time on one modern GPU: not measured in this project yet (no GPU was available).
"""
from fastadv_jax.configs import common, default
from fastadv_jax.training import schedules


def get_config(arg: str = "gradalign,eps=8"):
  preset, kv = common.parse_arg(arg)
  c = default.get_config()
  c.dataset, c.crop_padding, c.flip = "svhn_cropped", 4, False
  c.model = "preact_resnet18"
  c.half_precision = True
  c.optimizer, c.lr_schedule = "sgd", "cyclic"
  c.num_epochs, c.lr_max = 15, 0.05
  c.eps_warmup_epochs = 5.0
  c.eps = 8 / 255
  c.n_final_eval = 1000
  common.apply_preset(c, preset)
  if preset == "free":
    c.num_epochs, c.lr_max, c.method_args.free.replay, c.eps_warmup_epochs = 45, 0.01, 8, 15.0
  return common.finish(c, preset, kv,
                       lambda eps: schedules.grad_align_lambda(eps, "svhn_cropped"))

"""The 2024-26 fast-AT benchmark's protocol (fzjcdt/FastAT_Benchmark) for any method:
CIFAR-10, ResNet-18, eps 8/255, 100 epochs, label smoothing 0.4, weight averaging, selection on
a held-out validation set, final PGD and AutoAttack on the whole test set.

Command (argument: a method preset, then optional eps in 1/255 and other fields):
  python -m fastadv_jax.main --config=configs/fastat_benchmark.py:liet,seed=0 \
      --workdir=runs/fastat/liet_s0
  e.g. configs/fastat_benchmark.py:fgsm_pgi   configs/fastat_benchmark.py:pgd_at,ema_decay=0

The protocol, as the benchmark's code runs it:
  - ResNet-18 (post-activation, `model=resnet18`); SGD, weight decay 5e-4, batch 128; PyTorch's
    OneCycleLR(max_lr 0.1) stepped once per EPOCH over 100 epochs (lr 0.004 -> 0.1 at epoch 29
    -> 4e-7; momentum cycled 0.95 -> 0.85 -> 0.95, overriding 0.9);
  - the first 49,000 training images train (random crop 4 + flip), the last 1,000 validate (no
    augmentation);
  - label smoothing 0.4 in the training loss and in the training attack's loss (LIET: its own
    random smoothing with 0.6; FGSM-PCO: its soft targets, smoothed again; N-AAER and PGD-AT:
    the plain cross-entropy in the attack, as the benchmark's code);
  - weight averaging of every weight and BatchNorm statistic, tau 0.9995, from the first step
    (PGD-AT without it: `ema_decay=0`, tested at the last epoch);
  - each epoch the raw and the averaged weights get PGD-10 (step 2/255, random start) and FGSM
    on the validation set; the better of the two (tie: raw) is kept when its PGD beats the best
    so far (tie: higher clean accuracy); the test set is used once, at the end, on the kept
    weights: clean, PGD-50 (one restart) and AutoAttack (standard) on all 10,000 points.

Expected (the benchmark's data file, CIFAR-10, mean of seeds 0-2, clean / AutoAttack % / time
relative to FGSM-AT): pgd_at with WA 82.36 / 50.49 / 3.52; nuat 80.98 / 50.10 / 1.47; liet
80.68 / 49.99 / 1.31; fgsm_pgi 79.72 / 49.89 / 1.33; fgsm_fuap 80.64 / 49.73 / 1.47;
fgsm_cuap 80.76 / 49.55 / 1.36; fgsm_uap 80.61 / 49.44 / 1.28; gat 85.10 / 49.15 / 1.44;
fgsm_pco 84.69 / 48.52 / 1.50; gradalign 79.39 / 47.99 / 2.81; nfgsm 78.59 / 47.77 / 0.97;
n_aaer 77.67 / 47.38 / 0.93; zerograd 75.85 / 45.94 / 0.96; free 75.20 / 44.34 / 0.99;
pgd_at without WA 85.35 / 44.33 / 3.48; fgsm_rs 77.66 / 43.09 / 0.95; fgsm 69.17 / 37.28 /
1.00; elle 77.78 / 32.46 / 1.47 (FGSM-AT took 1996 s there).
Not run in this project: no CIFAR-10 and no GPU here (tested on mock data). Needs the CIFAR-10
TFDS files (docs/devices.md).
"""
import ml_collections

from fastadv_jax.configs import common, default
from fastadv_jax.training import schedules

EPOCHS = 100
TRAIN_IMAGES = 50_000


def protocol(c: ml_collections.ConfigDict, n_train: int, validation: int) -> None:
  """The benchmark's training protocol on config `c` (any dataset): label smoothing, weight
  averaging, validation split and selection once per epoch; `n_train` is the training set's
  size before the validation images are held out."""
  c.label_smoothing, c.label_smoothing_attack = 0.4, True
  c.ema_decay, c.ema_warmup, c.ema_batch_stats = 0.9995, False, True
  c.validation_size = validation
  c.selection = "validation"
  c.eval_every = schedules.steps_per_epoch(n_train - validation, c.batch_size)  # once per epoch
  c.eval_pgd_steps = 10
  c.eval_step_alpha = 0.25      # 2/255 at eps 8/255


def per_method(c: ml_collections.ConfigDict, preset: str) -> None:
  """Where the benchmark's code departs from the protocol for one method."""
  if preset in ("pgd_at", "n_aaer"):
    c.label_smoothing_attack = False  # their attacks ascend the plain cross-entropy
  if preset == "n_aaer":
    c.label_smoothing = 0.0           # its config's smoothing is not read by its loss


def get_config(arg: str = "liet") -> ml_collections.ConfigDict:
  preset, kv = common.parse_arg(arg)
  c = default.get_config()
  c.dataset, c.crop_padding, c.flip = "cifar10", 4, True
  c.model = "resnet18"
  c.half_precision = True
  c.optimizer, c.weight_decay, c.lr_max = "sgd", 5e-4, 0.1
  c.lr_schedule, c.schedule_unit = "onecycle", "epoch"
  c.batch_size = 128
  c.num_epochs = EPOCHS
  c.eps = 8 / 255
  protocol(c, TRAIN_IMAGES, validation=1000)
  c.n_final_eval = -1
  c.final_attack = "pgd,autoattack"
  c.final_pgd_steps, c.final_pgd_restarts = 50, 1
  c.checkpoint_every = c.eval_every
  common.apply_preset(c, preset)
  per_method(c, preset)
  # GradAlign: the paper's lambda(eps) for CIFAR-10 (0.2 at 8/255), as the benchmark runs it.
  return common.finish(c, preset, kv, lambda eps: schedules.grad_align_lambda(eps, "cifar10"))

"""Default: FGSM + GradAlign on Fashion-MNIST with the small CNN, on 2 CPU cores.

Every field the library reads is declared here, with a comment.

Command (from the repo root; `bash scripts/train.sh` does the same after set-up):
  .venv/bin/python -m fastadv_jax.main --config=configs/default.py --workdir=runs/default

Expected (measured 2026-11-22 on a 2-core CPU, jax 0.12.0.1, oneDNN convolutions on): clean
81.8 %, PGD-50-10 63.8 % at eps = 0.1 on the first 1000 test points; 84-143 s of training and
3-4 minutes wall in all, depending on the machine's load (README).
Every other config imports this one and overrides what differs.
"""
from typing import Any

import ml_collections

from fastadv_jax import methods, models


def args_defaults(kind: Any) -> ml_collections.ConfigDict:
  """`config.method_args` (kind=methods) or `config.model_args` (kind=models): one sub-config per
  registered record that has hyperparameters, holding its defaults (read when the config is
  built, after plugins are imported)."""
  out = ml_collections.ConfigDict()
  for name in kind.names():
    record = kind.get(name)
    if record.arg_names:
      defaults = record.make_args()
      out[name] = ml_collections.ConfigDict({k: getattr(defaults, k) for k in record.arg_names})
  return out


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Modules to import before anything else (comma-separated): code outside the package that
  # registers methods, models or attacks (fastadv_jax/runtime/plugins.py). Recorded, so `evaluate`
  # imports them again.
  c.plugins = ""
  # Data. Pixels in [0, 1]; augmentation as the original (none for MNIST-like data).
  c.dataset = "fashion_mnist"   # cifar10 | svhn_cropped | mnist | fashion_mnist
  c.data_dir = ""               # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
  c.download = True             # let TFDS download if the dataset is not prepared
  c.crop_padding = 0            # random crop with this zero padding (4 for CIFAR-10 / SVHN)
  c.flip = False                # random horizontal flip (CIFAR-10 only)
  # Validation split: the LAST validation_size training images, held out of training (the
  # training set and the steps per epoch shrink) and never augmented; 0 = none. The 2024-26
  # fast-AT benchmark holds out 1000 of CIFAR-10's 50,000. Diagnosed every eval_every.
  c.validation_size = 0

  # Model, chosen by name.
  c.model = "small_cnn"         # a registered model: fastadv_jax.models.names() (docs/methods.md)
  # Each model's own hyperparameters, with its defaults: model_args.<model>.<field>, e.g.
  # --config.model_args.cnn.n_filters=4 (models.py: CNNArgs, SmallCNNArgs, PreActResNet18Args,
  # WideResNetArgs; a plugin model's record declares its own).
  c.model_args = args_defaults(models)
  c.half_precision = False      # bfloat16 compute, float32 parameters
  # Input normalisation inside the model, (x - input_mean) / input_std per channel, e.g. CIFAR-10's
  # (0.4914, 0.4822, 0.4465) / (0.2471, 0.2435, 0.2616) as RobustBench's models with `mu` /
  # `sigma` buffers. Data, eps and attacks stay in [0, 1] pixels. () = none (the default).
  c.input_mean = ()
  c.input_std = ()

  # Training perturbation (docs/algorithms.md §1). eps in pixel units ([0, 1]).
  c.method = "fgsm"             # a registered method: fastadv_jax.methods.names() (docs/methods.md)
  c.eps = 0.1
  c.attack_init = ""            # "" = the method's default; zero | uniform | corner
  c.eps_warmup_epochs = 0.0     # linear ramp of eps (and so of the FGSM step) over these epochs
  # Each method's own hyperparameters, owned by its module (its `Method.args` record, whose
  # defaults are the published values): method_args.<method>.<field>, e.g.
  # --config.method_args.nfgsm.noise=3 or --config.method_args.pgd.steps=2. Built from the live
  # registry, so a plugin method's (--config.plugins) are fields here too.
  c.method_args = args_defaults(methods)

  # Label smoothing (PyTorch's rule: 1 - s + s/C on the label, s/C elsewhere) of the training
  # cross-entropy; with label_smoothing_attack also of the loss the training attack ascends
  # (the 2024-26 fast-AT benchmark uses 0.4 in both). Evaluation attacks use the plain CE.
  c.label_smoothing = 0.0
  c.label_smoothing_attack = True

  # Weight averaging (fastadv_jax/training/weight_averaging.py): an EMA of the weights after every step,
  # ema <- tau ema + (1 - tau) theta. 0 = off; the benchmark: 0.9995, no warm-up, BatchNorm
  # statistics averaged too. ema_warmup: DeepMind's tau_t = min(tau, (1 + t) / (10 + t)).
  c.ema_decay = 0.0
  c.ema_warmup = False
  c.ema_batch_stats = True
  # Which weights a run keeps besides the last ones (monitoring.py, docs/algorithms.md §4.3):
  # "early_stopping": the best train-subset PGD of the raw weights (results.json "best");
  # "validation" (the benchmark's; needs validation_size > 0): at every diagnostic the raw and
  # averaged weights get PGD on the validation set, the higher one (tie: raw) is kept when its
  # PGD beats the best so far (tie: higher clean accuracy) (results.json "selected"); the test
  # set is then evaluated once, at the end (no periodic test diagnostics).
  c.selection = "early_stopping"

  # GradAlign (docs/algorithms.md §2). 0 disables it.
  c.grad_align_lambda = 0.2
  c.grad_align_backprop_g1 = False  # True: differentiate through the clean gradient too
  # How GradAlign's parameter gradient is computed (same value, rounding aside): double_backprop
  # (reverse over reverse) | jvp (reverse over forward) | auto: jvp for the ResNets, where
  # XLA:CPU ran it 1.6-1.7x faster, double_backprop for the CNNs (BENCHMARKS.md).
  c.grad_align_derivative = "auto"

  # Optimisation (docs/algorithms.md §3.2); learning rate set per iteration (or per epoch).
  c.optimizer = "sgd"           # sgd | adam
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = "cyclic"      # cyclic | piecewise | constant | onecycle (PyTorch's OneCycleLR)
  # iteration: the schedule moves every optimiser step | epoch: held for each epoch, epoch e at
  # the schedule's value for e (PyTorch's scheduler.step() after each epoch; the 2024-26 fast-AT
  # benchmark's onecycle with num_epochs 100). onecycle also cycles momentum 0.95->0.85->0.95.
  c.schedule_unit = "iteration"
  c.lr_max = 0.05
  c.batch_size = 128            # global batch, split over all local devices
  c.num_epochs = 3
  c.seed = 0
  # How the step runs over the devices (fastadv_jax/training/engines.py): "pmap" (stacked per-device
  # copies) or "shard_map" (jit + shard_map on a Mesh; the state is global jax.Arrays and
  # Orbax checkpoints them shard by shard). Same numbers; docs/devices.md compares them.
  c.parallelism = "pmap"

  # Logging, diagnostics, checkpoints. Durations in iterations (= optimiser steps).
  c.log_every = 50
  c.eval_every = 200
  c.n_eval_points = 256         # fixed train / test subsets for the periodic diagnostics
  c.eval_pgd_steps = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.progress_bar = True

  # Catastrophic-overfitting flag (monitoring.py), two signatures on the test diagnostics:
  # "pgd_collapse": PGD accuracy falls below `co_pgd_drop` x its best so far (best >=
  # co_min_best_pgd) while the alignment falls below `co_alignment_drop` x its value there;
  # "fgsm_gap": FGSM accuracy >= PGD accuracy + co_fgsm_pgd_gap (FGSM no longer finds them).
  c.co_pgd_drop = 0.5
  c.co_min_best_pgd = 0.1
  c.co_alignment_drop = 0.7
  c.co_fgsm_pgd_gap = 0.3

  # Final evaluation (docs/algorithms.md §4): PGD-50-10, step eps/4, on the first n_final_eval test points.
  c.eval_step_alpha = 0.25      # evaluation PGD step = eval_step_alpha * eps (diagnostics too)
  c.n_final_eval = 1000         # -1 = the whole test set
  c.final_pgd_steps = 50
  c.final_pgd_restarts = 10
  c.final_attack = "pgd"        # pgd | autoattack | pgd,autoattack | AutoAttack components
  c.eval_batch_size = 500
  c.eval_early_stopped_model = True  # results.json "best" (selection = early_stopping)
  return c

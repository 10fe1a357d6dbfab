"""Fashion-MNIST, small CNN: the CPU-sized study of catastrophic overfitting (EXPERIMENTS.md).

Command (eps in 1/255; methods as configs/cifar10.py):
  python -m fastadv_jax.main --config=configs/fashion_mnist.py:fgsm,eps=64,seed=0 \
      --workdir=runs/fmnist/fgsm_64_s0
Expected results and run times: EXPERIMENTS.md (measured on this project's 2-core CPU machine).
GradAlign's lambda here is 1.0 (`grad_align_lambda=...` overrides it); the paper gives no
Fashion-MNIST schedule. One epoch, eps ramped over its first quarter, diagnostics every 50
iterations; Free-AT replays each minibatch 4 times.
"""
from fastadv_jax.configs import common, default


def get_config(arg: str = "gradalign,eps=64"):
  preset, kv = common.parse_arg(arg)
  c = default.get_config()
  study_setting(c)
  common.apply_preset(c, preset)
  method_setting(c, preset)
  return common.finish(c, preset, kv, lambda eps: 1.0)


def study_setting(c) -> None:
  """The study's model, schedule and diagnostics (shared by configs/fmnist_protocol.py)."""
  c.model_args.small_cnn.n_filters = 16  # small_cnn width (width 8 trained unstably in a pilot)
  c.num_epochs = 1
  c.lr_max = 0.05
  c.eps = 64 / 255
  c.eval_every = 50             # catastrophic overfitting happens within the first 200 iterations
  # Without a ramp, PGD-10 at eps 48/255 and 80/255 collapsed to a constant classifier within 50
  # iterations (dead ReLUs); as the paper does on SVHN, eps grows linearly over a quarter epoch.
  c.eps_warmup_epochs = 0.25
  c.n_final_eval = 300
  c.progress_bar = False


def method_setting(c, preset: str) -> None:
  """Per-method settings of the study: Free-AT replays each minibatch 4 times."""
  if preset == "free":
    c.method_args.free.replay = 4

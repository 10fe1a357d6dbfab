"""Shared parsing of config arguments: `--config=configs/<file>.py:<method>[,eps=E][,seed=S]...`.

Keys after the method override plain fields; `eps` is given in units of 1/255 as in the paper.
Methods are the paper's names; each maps to config fields in `apply_method`.
"""
import ml_collections

PAPER_METHODS = ("standard", "fgsm", "fgsm_rs", "free", "pgd2", "pgd10", "gradalign",
                 "random_corner", "pgd_corner")


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  if not parts or "=" in parts[0]:
    raise ValueError(f"config argument {arg!r}: expected '<method>[,key=value...]' with method in "
                     f"{PAPER_METHODS}")
  method, kv = parts[0], {}
  for p in parts[1:]:
    if "=" not in p:
      raise ValueError(f"config argument {arg!r}: {p!r} is not key=value")
    k, v = p.split("=", 1)
    kv[k.strip()] = v.strip()
  if method not in PAPER_METHODS:
    raise ValueError(f"config argument {arg!r}: unknown method {method!r}; choose from "
                     f"{PAPER_METHODS}")
  return method, kv


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
  """The paper's method names as config fields (GradAlign = FGSM from zero + the regulariser)."""
  c.grad_align_lambda = 0.0
  if method in ("pgd2", "pgd10"):
    c.method = "pgd"
    c.pgd_steps = 2 if method == "pgd2" else 10
    c.pgd_alpha = 0.5 if method == "pgd2" else 0.2
    c.attack_init = "zero"
  elif method == "gradalign":
    c.method = "fgsm"
  else:
    c.method = method


def apply_overrides(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """eps=E is in 1/255; other keys set fields of the same type (seed=1, num_epochs=5, ...)."""
  for k, v in kv.items():
    if k == "eps":
      c.eps = float(v) / 255.0
    elif k not in c:
      raise ValueError(f"config argument: unknown field {k!r}")
    else:
      current = c[k]
      c[k] = (v.lower() in ("1", "true", "yes")) if isinstance(current, bool) else type(current)(v)

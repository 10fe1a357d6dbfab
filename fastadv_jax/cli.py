"""The command lines' one error path: every expected failure is one line on stderr and a
non-zero exit, before any work where the input is to blame.

- bad flags or config overrides, missing config files, bad config values, unusable workdirs,
  missing data, checkpoints that do not fit, NaN stops: `error: <what>` and exit 2;
- Ctrl-C (SIGINT) and SIGTERM (pre-emption): a checkpoint is saved by the trainer, then one
  line and exit 130 / 143, the shell conventions (128 + signal number).
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import app, flags


def fail(message: str, code: int = 2) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _innermost(e: BaseException) -> BaseException:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return e


def describe_flag_error(e: BaseException, argv: list[str]) -> str:
  """One line for an exception raised while absl parsed the command line."""
  root = _innermost(e)
  text = str(root).strip().strip('"').strip("'").splitlines()
  text = text[0] if text else type(root).__name__
  if isinstance(root, (KeyError, AttributeError)):
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    name = text.split("'")[1] if "'" in text else text
    where = next((o for o in overrides if o.endswith("." + name) or o == f"--config.{name}"),
                 "--config")
    from fastadv_jax import config_validation  # pylint: disable=import-outside-toplevel
    return (f"{where}: unknown config field {name!r} (every field is declared in "
            f"configs/default.py{config_validation.moved_field_hint(name)})")
  if isinstance(root, OSError) and "config" in str(e):
    return f"--config: cannot load the config file: {text}"
  return text if isinstance(e, flags.Error) else f"{type(root).__name__}: {text}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line instead of a traceback for any parsing failure."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(describe_flag_error(e, argv))


def run(main: Callable[[list[str]], None], expected: tuple[type[BaseException], ...]) -> None:
  """app.run(main) where `expected` errors and interruptions end in one line."""
  def wrapped(argv):
    try:
      main(argv)
    except expected as e:
      fail(str(e))
    except KeyboardInterrupt as e:
      signal_name = "SIGTERM" if str(e) == "SIGTERM" else "SIGINT"
      print(f"interrupted ({signal_name}): the latest checkpoint is kept; run the same command "
            "again to resume", file=sys.stderr)
      sys.exit(143 if signal_name == "SIGTERM" else 130)

  app.run(wrapped, flags_parser=parse_flags)

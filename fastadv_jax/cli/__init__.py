"""The command lines' one error path: every expected failure is one line on stderr and a
non-zero exit, before any work where the input is to blame.

- bad flags or config overrides, positional arguments (none is taken), missing config files,
  bad config values, unusable workdirs, missing data, checkpoints that do not fit, NaN stops:
  `error: <what>` and exit 2;
- Ctrl-C (SIGINT) and SIGTERM (pre-emption): a checkpoint is saved by the trainer, then one
  line and exit 130 / 143, the shell conventions (128 + signal number); in a multi-process run
  a signal to one process stops every process this way (preemption.py).
"""
from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn

import ml_collections
from absl import app, flags
# the parser class of DEFINE_config_file's flags (not re-exported by the package)
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from fastadv_jax.runtime import cli_logging, plugins
from fastadv_jax.training import config_validation, preemption


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
  text = _unquote(str(root).strip()).splitlines()
  text = text[0] if text else type(root).__name__
  if isinstance(root, (KeyError, AttributeError)):
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    name = text.split("'")[1] if "'" in text else text
    where = next((o for o in overrides if o.endswith("." + name) or o == f"--config.{name}"),
                 "--config")
    return (f"{where}: unknown config field {name!r} (every field is declared in "
            f"configs/default.py{config_validation.moved_field_hint(name)})")
  if isinstance(root, OSError) and "config" in str(e):
    return f"--config: cannot load the config file: {_load_failure(root)}"
  flag = re.match(r"flag (--[\w.-]+)", str(e))  # absl's "flag --name=value: why"
  if flag is not None and isinstance(e, flags.Error):
    return f"{flag.group(1)}: {_plain_value_error(text)}"
  return text if isinstance(e, flags.Error) else f"{type(root).__name__}: {text}"


def _plain_value_error(text: str) -> str:
  """Python's conversion errors in a user's words ("not a number: 'abc'")."""
  for python, plain in (("could not convert string to float: ", "not a number: "),
                        (r"invalid literal for int() with base 10: ", "not an integer: ")):
    if text.startswith(python):
      return plain + text[len(python):]
  boolean = re.fullmatch(r"\('Non-boolean argument to boolean flag', (.*)\)", text)
  return f"not true or false: {boolean.group(1)}" if boolean else text


def _unquote(text: str) -> str:
  """'x' -> x (str() of a KeyError quotes its key); a quote at one end only is the message's
  own ("Unknown command line flag 'progress'" keeps both of its quotes)."""
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    return text[1:-1]
  return text


def _load_failure(error: BaseException) -> str:
  """Why ml_collections could not load a config file: the last line of its report, which
  names the file ("[Errno 2] No such file or directory: 'configs/nope.py'")."""
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  return lines[-1] if lines else type(error).__name__


def _check_config_files() -> None:
  """A config-file flag (ml_collections' DEFINE_config_file) whose file could not be loaded
  holds a placeholder that raises on first use, deep inside the command; this fails now, in
  one line naming the flag and the file."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if not isinstance(flag.parser, ConfigFileFlagParser) or flag.value is None:
      continue
    try:
      getattr(flag.value, "get")  # the placeholder raises its load error on any attribute
    except OSError as e:
      fail(f"--{name}: cannot load the config file: {_load_failure(e.__cause__ or e)}")
    except AttributeError:
      pass  # a value that is no config at all: said below
    if not isinstance(flag.value, ml_collections.ConfigDict):
      fail(f"--{name}: get_config() in {flag.config_filename} returned "
           f"{type(flag.value).__name__} {_short_repr(flag.value)}, not an "
           "ml_collections.ConfigDict")


def _short_repr(value: object) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _check_no_positional(rest: list[str]) -> None:
  """No command line takes positional arguments: a stray `attack=autoattack` (the `--` left
  out) would otherwise be ignored and the command run with the default instead."""
  if len(rest) <= 1:
    return
  stray = rest[1]
  hint = ""
  if "=" in stray and stray.split("=", 1)[0].lstrip("-") in flags.FLAGS:
    hint = f"; did you mean --{stray.lstrip('-')}?"
  fail(f"unexpected argument {stray!r}: every option is a --flag=value{hint}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line instead of a traceback for any parsing failure, for an
  unloadable config file and for a positional argument."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(describe_flag_error(e, argv))
  _check_config_files()
  _check_no_positional(rest)
  return rest


def run(main: Callable[[list[str]], None], expected: tuple[type[BaseException], ...]) -> None:
  """app.run(main) where `expected` errors and interruptions end in one line. Installed
  plugins (entry points) are imported first, by every command line (a no-op where the command
  imported them already, before its flags were defined)."""
  cli_logging.quiet_startup()  # for callers of run() that skipped the module-level call
  try:
    plugins.load_for_command_line()
  except plugins.PluginError as e:  # an installed plugin's failure names itself
    named = plugins.from_argv(sys.argv) and not str(e).startswith("installed plugin")
    fail(f"{plugins.CONFIG_FLAG}: {e}" if named else str(e))
  def wrapped(argv):
    try:
      main(argv)
    except expected as e:
      fail(str(e))
    except KeyboardInterrupt as e:
      signal_name = "SIGTERM" if str(e) == "SIGTERM" else "SIGINT"
      print(f"interrupted ({signal_name}): the latest checkpoint is kept; run the same command "
            "again to resume", file=sys.stderr)
      code = 143 if signal_name == "SIGTERM" else 130
      if "jax" in sys.modules:  # a process of a multi-process run stopped alone ends at once
        preemption.exit_if_alone(e, code)
      sys.exit(code)

  app.run(wrapped, flags_parser=parse_flags)

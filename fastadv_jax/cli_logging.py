"""Console logging for the command-line tools: our INFO lines, not Orbax's per-save chatter."""
import logging as py_logging

from absl import logging


class _DropLibraryInfo(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or "/tensorflow_datasets/" in record.pathname
    return record.levelno >= py_logging.WARNING or not noisy


def setup() -> None:
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryInfo())

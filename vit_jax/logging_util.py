"""Keeps the console readable: libraries' INFO chatter (orbax logs every file it writes) is
dropped, their warnings and errors and all of our own logs are kept.

Libraries' records that carry a traceback (orbax logs one from each of its threads when a save or
a read fails: hundreds on a failed resume) are dropped too, unless --verbosity=1: the error
reaches our code, which reports it once, in one line.
"""
import logging as std_logging
import sys
from typing import Optional

from absl import logging

_QUIET_LIBRARIES = ('/orbax/', '/etils/', '/tensorflow_datasets/')
# Whose records' tracebacks are dropped: those libraries, and asyncio reporting orbax's failed
# tasks ("Task exception was never retrieved") when their event loop is collected.
_TRACEBACK_SOURCES = _QUIET_LIBRARIES + ('/asyncio/',)


class _LibraryInfoFilter(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (record.exc_info and not logging.level_debug()
        and any(lib in record.pathname for lib in _TRACEBACK_SOURCES)):
      return False
    return (record.levelno >= std_logging.WARNING
            or not any(lib in record.pathname for lib in _QUIET_LIBRARIES))


def quiet_libraries() -> None:
  """Installs the filter above on absl's handler, and a sys.unraisablehook that drops orbax's
  late callbacks (logged at debug level)."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  previous = sys.unraisablehook

  def hook(unraisable):
    # Dropped: tensorstore completing a read or write of a failed orbax operation after orbax
    # closed its event loop (reported here once per pending array).
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      logging.debug('Ignored a late callback of a failed checkpoint operation: %s', error)
      return
    previous(unraisable)

  sys.unraisablehook = hook


def gib(x: Optional[float]) -> str:
  """A byte count as 'x.xx GiB' or 'x.x MiB' ('n/a' for None)."""
  if x is None:
    return 'n/a'
  return f'{x / 2**30:.2f} GiB' if x >= 2**30 else f'{x / 2**20:.1f} MiB'

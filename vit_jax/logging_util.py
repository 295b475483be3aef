"""Keeps the console readable: libraries' INFO chatter (orbax logs every file it writes) is
dropped, their warnings and errors and all of our own logs are kept."""
import logging as std_logging

from absl import logging

_QUIET_LIBRARIES = ('/orbax/', '/etils/', '/tensorflow_datasets/')


class _LibraryInfoFilter(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or not any(lib in record.pathname for lib in _QUIET_LIBRARIES))


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())

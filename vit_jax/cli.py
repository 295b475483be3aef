"""The command-line convention every `python -m vit_jax.<command>` follows.

    0       done
    1       a bug: Python's traceback
    2       `Error: <message>` on stderr, nothing else: a bad flag, value, file, dataset or
            workdir (a user error); add --verbosity=1 to log its traceback too
    128+N   stopped by signal N (130: SIGINT, 143: SIGTERM)

A command's module ends with `cli.run(main)`; inside, it raises `UserError` (or lets the
`ValueError` / `OSError` of a bad input propagate) and `Interrupted` on a signal. Commands with
other exit codes of their own (main's 3 for a non-finite loss) call `fail` with them.
Importing this module imports no TensorFlow (the benchmark runs where there is none).
"""
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

EXIT_ERROR = 2


class UserError(Exception):
  """Bad input the user must fix; the message names the flag, file, key or value at fault."""


class Interrupted(Exception):
  """Stopped by a signal (after saving what there was to save)."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


def user_error_types() -> tuple:
  """The exceptions reported as user errors: ours, bad values, unusable paths, and TensorFlow's
  file-system errors (gs://, permissions) where TensorFlow is loaded."""
  types = (UserError, app.UsageError, ValueError, OSError)
  op_error = getattr(getattr(sys.modules.get('tensorflow'), 'errors', None), 'OpError', None)
  return types if op_error is None else types + (op_error,)


def fail(error: Any, exit_code: int = EXIT_ERROR) -> NoReturn:
  """Prints `Error: <error>` to stderr (its traceback only with --verbosity=1) and exits."""
  if isinstance(error, BaseException):
    logging.debug('Traceback of the error:', exc_info=error)
  print(f'Error: {error}', file=sys.stderr, flush=True)
  sys.exit(exit_code)


def _flag_error_message(error: flags.Error) -> str:
  """The flag's message; for a config file that raised, its error instead of the traceback
  that ml_collections puts in the message."""
  cause = error
  while cause.__cause__ or cause.__context__:
    cause = cause.__cause__ or cause.__context__
  if cause is error:
    return str(error)
  return f'{str(error).splitlines()[0]} {type(cause).__name__}: {cause}'


def _config_file_error(flag_values: flags.FlagValues) -> Optional[str]:
  """ml_collections keeps a config file that failed to load as a value that raises on first use
  (with a multi-line message); this names it at parse time, in one line."""
  for name in flag_values:
    value = flag_values[name].value
    if type(value).__name__ == '_ErrorConfig':
      return f'flag --{name}: {_first_and_last_line(object.__getattribute__(value, "_error"))}'
  return None


def _first_and_last_line(error: Any) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f'{lines[0]}: {lines[-1]}' if len(lines) > 1 else ''.join(lines)


def parse_flags(argv: Sequence[str]):
  """absl's flag parsing, but a bad flag gets one `Error: <message>` line and exit code 2."""
  try:
    remaining = flags.FLAGS(argv)
    message = _config_file_error(flags.FLAGS)
    if message is None:
      return remaining
  except flags.Error as e:
    message = _flag_error_message(e)
  except OSError as e:  # A config file that failed to load, at its first --config.x override.
    if 'failure to load' not in str(e):
      raise
    names = [arg[2:].split('=')[0].split('.')[0] for arg in argv[1:]
             if arg.startswith('--') and '.' in arg.split('=')[0]]
    text = str(e).split('failure to load: ', 1)[-1]
    message = f'flag --{names[0] if names else "config"}: {_first_and_last_line(text)}'
  except AttributeError as e:  # ml_collections: `--config.x=...` where the config has no x.
    key_error = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
    message = 'Unknown config field ' + str(key_error.args[0]).replace('\n', '. ')
  print(f'Error: {message} (--helpshort lists the flags)', file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)


def check_no_arguments(argv: Sequence[str]) -> None:
  """Commands take flags only: a stray positional argument is a user error."""
  if len(argv) > 1:
    raise UserError(f'Unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')


def guarded(main: Callable[[list], Any]) -> Callable[[list], Any]:
  """`main` with the convention above (what `run` runs; tests call a command through it)."""

  def run_main(argv):
    try:
      return main(argv)
    except Interrupted as e:
      print(e, file=sys.stderr, flush=True)
      sys.exit(128 + e.signum)
    except KeyboardInterrupt:
      print('Interrupted.', file=sys.stderr, flush=True)
      sys.exit(130)
    except user_error_types() as e:
      fail(e)

  return run_main


def run(main: Callable[[list], Any]) -> NoReturn:
  """`absl.app.run(main)` with the convention above."""
  app.run(guarded(main), flags_parser=parse_flags)

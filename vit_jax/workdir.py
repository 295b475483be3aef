"""The training workdir: what a run writes where (the names below; docs/ARCHITECTURE.md, "A
training workdir"), and how every command reads it back. Every read and write goes through
tf.io.gfile, so a workdir may be a gs:// URL. Inference reads the finished model (model.npz and
config.json); `main --mode=eval` the latest orbax state in checkpoints/ (a run in progress).
"""
import dataclasses
import datetime
import json
import os
import socket
from typing import Iterator, Mapping, NamedTuple, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import config_lib

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
MODEL = 'model.npz'
CHECKPOINTS = 'checkpoints'
TENSORBOARD = 'tensorboard'
LOCK = 'lock'
COMPILATION_CACHE = 'compilation_cache'


def path(workdir: str, name: str) -> str:
  """WORKDIR/name for one of the names above (URLs keep their scheme: gs://b/w/config.json)."""
  return os.path.join(workdir, name)


def is_workdir(location: str) -> bool:
  """Whether `location` (a local path or a tf.io.gfile URL) is a directory."""
  return tf.io.gfile.isdir(location)


# ---------------------------------------------------------------------------------------------
# config.json


def read_config(workdir: str) -> Optional[dict]:
  """WORKDIR/config.json as a JSON dict, None when there is none; ValueError naming the file
  when it is not a JSON object."""
  config_path = path(workdir, CONFIG)
  if not tf.io.gfile.exists(config_path):
    return None
  with tf.io.gfile.GFile(config_path) as f:
    text = f.read()
  try:
    saved = json.loads(text)
  except ValueError as e:
    raise ValueError(f'{config_path} is not valid JSON ({e}).') from e
  if not isinstance(saved, dict):
    raise ValueError(f'{config_path} holds a JSON {type(saved).__name__}, not a config.')
  return saved


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir written by a run with another config (see config_lib.RESUMABLE_FIELDS)."""
  try:
    saved = read_config(workdir)
  except ValueError as e:
    raise ValueError(f'{e} Delete it to resume with this config.') from e
  if saved is None:
    return
  changes = config_lib.config_changes(saved, config)
  if not changes:
    return
  listing = '\n  '.join(changes)
  if not config.allow_config_change:
    raise ValueError(
        f'{workdir} holds a run with another config (field: in {CONFIG} -> now):\n  '
        f'{listing}\nUse another --workdir, or --config.allow_config_change=True to resume this '
        'run with the new config.')
  logging.warning('Resuming %s with a changed config (config.allow_config_change=True):\n  %s',
                  workdir, listing)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Process 0 writes WORKDIR/config.json (replacing it in one rename)."""
  if jax.process_index() == 0:
    checkpoint.write_atomically(path(workdir, CONFIG),
                                config.to_json_best_effort(indent=2, sort_keys=True))


def read_model_files(workdir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the run's config, the path of its model.npz) of a finished workdir, for inference."""
  saved = read_config(workdir)
  if saved is None:
    raise FileNotFoundError(f'Workdir {workdir} has no {CONFIG}.')
  model_path = path(workdir, MODEL)
  if not tf.io.gfile.exists(model_path):
    raise FileNotFoundError(f'Workdir {workdir} has no {MODEL} (written when training ends).')
  if not isinstance(saved.get('model'), dict):
    raise ValueError(f'{path(workdir, CONFIG)} has no `model` field: it is not a vit_jax '
                     'training config.')
  return config_lib.with_defaults(saved), model_path


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


# A metrics line is ~200 bytes; a longer one is not an event and only its start is kept.
_MAX_LINE_BYTES = 1 << 16
_CHUNK_BYTES = 1 << 18
_LINES_NAMED = 5  # Line numbers named in a warning about lines that are not events.


class _Line(NamedTuple):
  number: int  # 1-based, for messages.
  start: int  # Byte offsets of the line in the file (end: after its newline).
  end: int
  event: Optional[dict]  # None when the line is not a JSON event with a step.
  binary: bool  # Not UTF-8 text (or holding NUL bytes).
  complete: bool  # Ends with a newline.


def _read_lines(metrics_path: str) -> Iterator[_Line]:
  """The lines of a metrics file, read in chunks: memory holds one chunk and the first
  _MAX_LINE_BYTES of one line, whatever the size of the file or of its lines."""
  number = offset = length = 0
  head = b''
  with tf.io.gfile.GFile(metrics_path, 'rb') as f:
    while chunk := f.read(_CHUNK_BYTES):
      parts = chunk.split(b'\n')
      for i, part in enumerate(parts):
        head += part[:_MAX_LINE_BYTES + 1 - len(head)]
        length += len(part)
        if i == len(parts) - 1:
          break  # The line goes on in the next chunk.
        number, length = number + 1, length + 1
        yield _line(number, offset, length, head, complete=True)
        offset, head, length = offset + length, b'', 0
  if length:
    yield _line(number + 1, offset, length, head, complete=False)


def _line(number: int, start: int, length: int, head: bytes, complete: bool) -> _Line:
  """The line whose first bytes are `head`, parsed (when it is not too long for an event)."""
  event, binary = None, False
  if len(head) <= _MAX_LINE_BYTES:
    try:
      text = head.decode('utf-8')
      binary = '\0' in text
      if not binary and text.lstrip().startswith('{'):
        event = json.loads(text)
    except UnicodeDecodeError:
      binary = True
    except ValueError:  # Not JSON.
      pass
  if not (isinstance(event, dict) and isinstance(event.get('step'), int)):
    event = None
  return _Line(number, start, start + length, event, binary, complete)


class _NonEvents:
  """The lines of a metrics file that are not events, reported once: their count and first
  line numbers (not one warning each: a file of garbage can hold millions)."""

  def __init__(self, metrics_path: str):
    self._path, self.count, self.binary, self._numbers = metrics_path, 0, 0, []

  def add(self, line: _Line) -> None:
    if line.end - line.start <= 1 and not line.binary:  # An empty line.
      return
    self.count += 1
    self.binary += line.binary
    if len(self._numbers) < _LINES_NAMED:
      self._numbers.append(line.number)

  def warn(self, action: str) -> None:
    if not self.count:
      return
    more = ', ...' if self.count > len(self._numbers) else ''
    binary = f' ({self.binary} of them not UTF-8 text)' if self.binary else ''
    logging.warning('%s: %d line(s)%s are not JSON events with a step; %s: line %s%s.',
                    self._path, self.count, binary, action,
                    ', '.join(map(str, self._numbers)), more)


def read_metrics(workdir: str) -> list[dict]:
  """All events of WORKDIR/metrics.jsonl, in order; the lines that are not events are skipped
  with one warning (their count and first line numbers). ValueError naming the file when it is
  binary (no event, some lines not UTF-8 text)."""
  metrics_path = path(workdir, METRICS)
  if not tf.io.gfile.exists(metrics_path):
    return []
  events, others = [], _NonEvents(metrics_path)
  for line in _read_lines(metrics_path):
    if line.event is not None:
      events.append(line.event)
    else:
      others.add(line)
  if others.binary and not events:
    raise ValueError(f'{metrics_path} is not a metrics file: it holds no JSON event and '
                     f'{others.binary} of its lines are not UTF-8 text (a binary file?).')
  others.warn('skipped')
  return events


# The metrics of a run's last step that make its result.
RESULT_FIELDS = ('eval_top1', 'test_top1')


def final_result(workdir: str, total_steps: int) -> Optional[dict]:
  """{'eval_top1'[, 'test_top1']} at step `total_steps` of a finished run (its model.npz written),
  else None: how the sweep and the claims tell a finished run from one to resume."""
  if not tf.io.gfile.exists(path(workdir, MODEL)):
    return None
  result = {}
  for event in read_metrics(workdir):
    if event['step'] == total_steps:
      result.update({k: event[k] for k in RESULT_FIELDS if k in event})
  return result if 'eval_top1' in result else None


class MetricsWriter:
  """Writes metrics to WORKDIR/metrics.jsonl and TensorBoard event files. Only process 0 writes;
  the others get a writer that does nothing, so callers need no checks."""

  def __init__(self, workdir: str):
    self._path = path(workdir, METRICS)
    self._summary = None  # None: a process other than 0.
    if jax.process_index() == 0:
      tf.io.gfile.makedirs(workdir)
      self._summary = tf.summary.create_file_writer(path(workdir, TENSORBOARD))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if self._summary is None:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with tf.io.gfile.GFile(self._path, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    with self._summary.as_default(step=int(step)):
      for name, value in scalars.items():
        tf.summary.scalar(name, value)
    self._summary.flush()
    logging.info('step %d: %s', step, ', '.join(f'{k}={v:.5g}' for k, v in scalars.items()))


def rewind_metrics(workdir: str, step: int) -> None:
  """Drops the events after `step` from WORKDIR/metrics.jsonl (the resumed run writes them
  again): everything from the first event after `step` on, and a last line cut short (no
  newline: a write interrupted by a kill). Other lines that are not events are kept, with one
  warning naming them. Process 0 only; reads and copies in chunks."""
  metrics_path = path(workdir, METRICS)
  if jax.process_index() != 0 or not tf.io.gfile.exists(metrics_path):
    return
  others, dropped_from = _NonEvents(metrics_path), None
  for line in _read_lines(metrics_path):
    if (line.event and line.event['step'] > step) or not line.complete:
      dropped_from = line
      break
    if line.event is None:
      others.add(line)
  others.warn('kept as they are')
  if dropped_from is None:
    return
  logging.info('Dropping the lines after step %d from %s (from line %d).', step, metrics_path,
               dropped_from.number)
  _copy_start(metrics_path, dropped_from.start)


def _copy_start(target: str, size: int) -> None:
  """Cuts `target` to its first `size` bytes (replacing it in one rename), in chunks."""
  with tf.io.gfile.GFile(target, 'rb') as source, tf.io.gfile.GFile(target + '.tmp', 'wb') as out:
    out.write(b'')  # GFile creates the file at its first write: also when nothing is kept.
    while size > 0:
      chunk = source.read(min(_CHUNK_BYTES, size))
      if not chunk:
        break
      out.write(chunk)
      size -= len(chunk)
  tf.io.gfile.rename(target + '.tmp', target, overwrite=True)


# ---------------------------------------------------------------------------------------------
# The lock: one run per workdir.


class WorkdirInUse(cli.UserError):
  """Another run holds the workdir."""


@dataclasses.dataclass
class Lock:
  """The workdir held by this process (process 0), until `release()`."""
  workdir: str
  holder: Optional[dict]  # None on the processes other than 0, which hold nothing.
  created_workdir: bool = False  # The workdir did not exist before this run started.

  def release(self, *, failed_start: bool = False) -> None:
    """Removes the lock file if it is still ours; after a failed start, also a workdir that
    this start created (so that a failed start leaves nothing on disk)."""
    if self.holder is None:
      return
    lock_path = path(self.workdir, LOCK)
    if _read_holder(lock_path) == self.holder:
      tf.io.gfile.remove(lock_path)
    if failed_start and self.created_workdir and tf.io.gfile.exists(self.workdir):
      tf.io.gfile.rmtree(self.workdir)


# The flag of `python -m vit_jax.main` that passes `take_over=True` (named in the error).
TAKE_OVER_FLAG = '--take_over_lock'


def lock(workdir: str, *, take_over: bool = False) -> Lock:
  """Holds `workdir` for this run: process 0 takes the lock (the others hold an empty Lock),
  all processes fail together when it is taken. Raises WorkdirInUse (or FileExistsError for a
  workdir that is a file). A lock naming a process of this host that is gone is taken over;
  one naming another host (a shared workdir on NFS or gs://, its run killed there) only with
  `take_over`: this host cannot tell whether that run still goes on."""
  held, error = Lock(workdir, None), None
  if jax.process_index() == 0:
    try:
      held = _acquire(workdir, take_over)
    except Exception as e:  # pylint: disable=broad-except  (raised below, once all know)
      error = e
  if jax.process_count() > 1:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      raise WorkdirInUse(f'Process 0 could not hold {workdir}: see its error.')
  if error is not None:
    raise error
  return held


def check_writable(workdir: str) -> None:
  """Raises OSError naming the path when a run could not write its files: --workdir or
  WORKDIR/checkpoints is a file, or the deepest of them that exists does not take a new file
  (read-only, no permission). Called before a start changes anything: a run that went on would
  find no checkpoints, rewind metrics.jsonl and rewrite config.json, then fail at its first save."""
  checkpoints = path(workdir, CHECKPOINTS)
  for location, name in ((workdir, f'--workdir={workdir}'),
                         (checkpoints, f'The checkpoints folder {checkpoints}')):
    if tf.io.gfile.exists(location) and not tf.io.gfile.isdir(location):
      raise FileExistsError(f'{name} is a file, not a directory; move it away.')
  target = next((p for p in (checkpoints, workdir) if tf.io.gfile.exists(p)), None)
  if target is None:
    return
  probe = path(target, f'.write-test-{socket.gethostname()}-{os.getpid()}')
  try:
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('')
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, 'message', None) or getattr(e, 'strerror', None) or e
    raise PermissionError(f'Cannot write into {target} ({reason}): the run saves its '
                          'checkpoints there. Make it writable, or use another --workdir.') from e


def _acquire(workdir: str, take_over: bool) -> Lock:
  check_writable(workdir)
  created = not tf.io.gfile.exists(workdir)
  tf.io.gfile.makedirs(workdir)
  lock_path = path(workdir, LOCK)
  holder = {'host': socket.gethostname(), 'pid': os.getpid(),
            'since': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  if not _create(lock_path, holder):
    other = _read_holder(lock_path)
    if other is not None:  # None: released in the meantime.
      stale = _is_stale(other)
      if not (stale or take_over):
        raise WorkdirInUse(_in_use_message(workdir, other, lock_path))
      logging.warning('Taking over %s: it names host %s pid %s since %s, %s.', lock_path,
                      other.get('host'), other.get('pid'), other.get('since'),
                      'a process that is gone' if stale else f'as {TAKE_OVER_FLAG} asks')
      tf.io.gfile.remove(lock_path)
    if not _create(lock_path, holder):
      raise WorkdirInUse(_in_use_message(workdir, _read_holder(lock_path), lock_path))
  return Lock(workdir, holder, created)


def _create(lock_path: str, holder: dict) -> bool:
  """Writes the lock file unless one exists. Local paths: atomically (O_EXCL), so that of two
  runs started at the same moment one wins; remote ones (no exclusive create in tf.io.gfile):
  check, then write."""
  text = json.dumps(holder)
  if '://' not in lock_path:
    try:
      fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  if tf.io.gfile.exists(lock_path):
    return False
  with tf.io.gfile.GFile(lock_path, 'w') as f:
    f.write(text)
  return True


def _read_holder(lock_path: str) -> Optional[dict]:
  """The lock file's holder; {} for a file being written or unreadable; None without one."""
  try:
    with tf.io.gfile.GFile(lock_path) as f:
      holder = json.loads(f.read())
  except tf.errors.NotFoundError:
    return None
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
  """Whether the lock names a process of this host that no longer runs (or this process: a
  start in this process that never released it)."""
  pid = holder.get('pid')
  if holder.get('host') != socket.gethostname() or not isinstance(pid, int):
    return False
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # Alive, another user's.
    return False
  return False


def _in_use_message(workdir: str, holder: Optional[dict], lock_path: str) -> str:
  if not holder:
    return (f'{workdir} is in use: its lock file {lock_path} is being written or unreadable; '
            'delete it if no run uses this workdir.')
  return (f'{workdir} is in use by host {holder.get("host")} pid {holder.get("pid")} since '
          f'{holder.get("since")} (if that run is gone, e.g. killed on its host, rerun with '
          f'{TAKE_OVER_FLAG} to take the workdir over).')


def mismatch_error(error: ValueError, config: ml_collections.ConfigDict,
                   workdir: str) -> ValueError:
  """`error` (state_checkpoint.CheckpointMismatchError) with the fields that shape the state
  (config_lib.STATE_FIELDS) in which WORKDIR/config.json differs from `config`."""
  try:
    saved = read_config(workdir)
  except (ValueError, tf.errors.OpError):
    return error
  changes = [change for change in config_lib.config_changes(saved or {}, config)
             if change.startswith(config_lib.STATE_FIELDS)]
  if not changes:
    return error
  return ValueError(f'{error}\nThe fields that differ from {path(workdir, CONFIG)} (there -> '
                    'now):\n  ' + '\n  '.join(changes) + '\nUse the config they were trained '
                    'with, or another --workdir.')

"""The training workdir: what a run writes where, and how every command reads it back.

    WORKDIR/config.json    the run's full config, model included; written once a start has
                           validated the config and restored (or initialised) the state
    WORKDIR/metrics.jsonl  one JSON event per line: {"step": ..., "loss": ..., "eval_top1": ...}
    WORKDIR/checkpoints/   orbax training state: params, optimizer, RNG, step (state_checkpoint)
    WORKDIR/model.npz      the final params in the released layout, written when training ends
    WORKDIR/tensorboard/   TensorBoard event files
    WORKDIR/lock           the run that holds the workdir: host, pid, start time

Every read and write goes through tf.io.gfile, so a workdir may be a gs:// (or any tf.io.gfile)
URL; only orbax's checkpoints/ needs a filesystem tensorstore knows (local or gs://).

"A workdir as checkpoint" means two things, by what the command needs:
  * predict, analyze, report, export (`inference.load_model`): model.npz + config.json. They
    want the finished model in the released layout, on one device, with no optimizer state and
    no trainer (mesh, shardings): model.npz is exactly that and needs no orbax.
  * `main --mode=eval --checkpoint=WORKDIR` (`evaluate.checkpoint_params`): the latest orbax
    state in checkpoints/. Evaluation is how a run in progress or interrupted is checked, and
    model.npz exists only once training has ended; the state restores in the run's own sharding.
At the end of a run both hold the same parameters.
"""
import dataclasses
import datetime
import json
import os
import socket
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax import cli
from vit_jax import config_lib

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
MODEL = 'model.npz'
CHECKPOINTS = 'checkpoints'
TENSORBOARD = 'tensorboard'
LOCK = 'lock'
COMPILATION_CACHE = 'compilation_cache'  # vit_jax.compilation_cache


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
  changes = config_lib.config_changes(saved, json.loads(config.to_json_best_effort()))
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
    _write_text(path(workdir, CONFIG), config.to_json_best_effort(indent=2, sort_keys=True))


def _write_text(target: str, text: str) -> None:
  with tf.io.gfile.GFile(target + '.tmp', 'w') as f:
    f.write(text)
  tf.io.gfile.rename(target + '.tmp', target, overwrite=True)


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


@dataclasses.dataclass(frozen=True)
class _Line:
  number: int  # 1-based, for messages.
  text: str
  event: Optional[dict]  # None when the line is not a JSON event with a step.


def _parse(text: str) -> Optional[dict]:
  try:
    event = json.loads(text)
  except ValueError:
    return None
  return event if isinstance(event, dict) and isinstance(event.get('step'), int) else None


def _read_lines(metrics_path: str) -> list[_Line]:
  with tf.io.gfile.GFile(metrics_path) as f:
    texts = f.read().splitlines(keepends=True)
  return [_Line(i + 1, text, _parse(text)) for i, text in enumerate(texts)]


def read_metrics(workdir: str) -> list[dict]:
  """All events of WORKDIR/metrics.jsonl, in order; a line that is not one is skipped with a
  warning naming the file and line."""
  metrics_path = path(workdir, METRICS)
  if not tf.io.gfile.exists(metrics_path):
    return []
  events = []
  for line in _read_lines(metrics_path):
    if line.event is not None:
      events.append(line.event)
    elif line.text.strip():
      logging.warning('%s line %d is not a JSON event with a step; skipped: %.80r',
                      metrics_path, line.number, line.text)
  return events


def rewind_metrics(workdir: str, step: int) -> None:
  """Drops the events after `step` from WORKDIR/metrics.jsonl (the resumed run writes them
  again): everything from the first event after `step` on, and a last line cut short (no
  newline: a write interrupted by a kill). Other lines that are not events are kept, with a
  warning naming them. Process 0 only."""
  metrics_path = path(workdir, METRICS)
  if jax.process_index() != 0 or not tf.io.gfile.exists(metrics_path):
    return
  lines = _read_lines(metrics_path)
  end = next((i for i, line in enumerate(lines) if line.event and line.event['step'] > step),
             len(lines))
  if end == len(lines) and lines and not lines[-1].text.endswith('\n'):
    end -= 1
  for line in lines[:end]:
    if line.event is None and line.text.strip():
      logging.warning('%s line %d is not a JSON event with a step; kept as it is: %.80r',
                      metrics_path, line.number, line.text)
  if end == len(lines):
    return
  logging.info('Dropping %d line(s) after step %d from %s (from line %d).', len(lines) - end,
               step, metrics_path, lines[end].number)
  _write_text(metrics_path, ''.join(line.text for line in lines[:end]))


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


def lock(workdir: str) -> Lock:
  """Holds `workdir` for this run: process 0 takes the lock (the others hold an empty Lock),
  all processes fail together when it is taken. Raises WorkdirInUse (or FileExistsError for a
  workdir that is a file)."""
  held, error = Lock(workdir, None), None
  if jax.process_index() == 0:
    try:
      held = _acquire(workdir)
    except Exception as e:  # pylint: disable=broad-except  (raised below, once all know)
      error = e
  if jax.process_count() > 1:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      raise WorkdirInUse(f'Process 0 could not hold {workdir}: see its error.')
  if error is not None:
    raise error
  return held


def _acquire(workdir: str) -> Lock:
  if tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
    raise FileExistsError(f'--workdir={workdir} is a file, not a directory.')
  created = not tf.io.gfile.exists(workdir)
  tf.io.gfile.makedirs(workdir)
  lock_path = path(workdir, LOCK)
  holder = {'host': socket.gethostname(), 'pid': os.getpid(),
            'since': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  if not _create(lock_path, holder):
    other = _read_holder(lock_path)
    if other is not None:  # None: released in the meantime.
      if not _is_stale(other):
        raise WorkdirInUse(_in_use_message(workdir, other, lock_path))
      logging.warning('Taking over %s: it names host %s pid %s since %s, a process that is '
                      'gone.', lock_path, other['host'], other['pid'], other.get('since'))
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
          f'{holder.get("since")} (delete {lock_path} if that run is gone).')


def mismatch_error(error: ValueError, config: ml_collections.ConfigDict,
                   workdir: str) -> ValueError:
  """`error` (state_checkpoint.CheckpointMismatchError) with the fields that shape the state
  (config_lib.STATE_FIELDS) in which WORKDIR/config.json differs from `config`."""
  try:
    saved = read_config(workdir)
  except (ValueError, tf.errors.OpError):
    return error
  changes = config_lib.state_changes(saved or {}, json.loads(config.to_json_best_effort()))
  if not changes:
    return error
  return ValueError(f'{error}\nThe fields that differ from {path(workdir, CONFIG)} (there -> '
                    'now):\n  ' + '\n  '.join(changes) + '\nUse the config they were trained '
                    'with, or another --workdir.')

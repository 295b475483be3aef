"""Training-state checkpoints: the sharded train state, via orbax.

Each checkpoint is a step directory `DIR/<step>/` holding one orbax item, `state` (the train-state
pytree, typed PRNG keys included, written shard by shard by the processes that own them).
Atomicity is orbax's: unfinished steps are never listed or restored, and are deliberately not
swept away when a checkpointer opens the directory, where a reader (an evaluator) would delete a
running trainer's save in progress. Unreadable, mismatched and failed saves: README "When things
go wrong". Every process must make the same calls with the same arguments (they synchronise
inside orbax).
"""
import re
import textwrap
import time
from typing import Any, Optional, Tuple

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

_STATE = 'state'
# What orbax and tensorstore raise for unreadable or unwritable checkpoint files.
_IO_ERRORS = (ValueError, OSError)
_UNRESTORABLE_SUFFIX = '.unrestorable'


class CheckpointSaveError(OSError):
  """A training checkpoint could not be written; the previous ones are kept."""


class CheckpointMismatchError(ValueError):
  """The checkpoints are intact but hold another state layout (another model config)."""


class TrainCheckpointer:
  """Saves the train state every `save_every` steps (0: only when asked or preempted) and keeps
  the last `keep` checkpoints."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    if save_every < 0:
      raise ValueError(f'save_every={save_every}; expected a number of steps, or 0 for no '
                       'periodic checkpoints.')
    if keep < 1:
      raise ValueError(f'keep={keep}; expected at least one checkpoint to keep.')
    self._directory = directory
    self._save_every = save_every
    self._pending_step = None  # Of the asynchronous save that may still be running.
    self._pending_since = 0.0  # time.monotonic() when it started.
    self._save_failed = False
    policies = ocp.checkpoint_managers
    periodic = [policies.FixedIntervalPolicy(save_every)] if save_every else []
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        # Also saves when the cluster announces a preemption (a no-op where JAX's preemption
        # service is not running, e.g. on CPU).
        save_decision_policy=policies.AnySavePolicy(
            periodic + [policies.PreemptionCheckpointingPolicy()]),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=(_STATE,))

  def should_save(self, step: int) -> bool:
    """Whether `step` is due: a multiple of `save_every`, or a preemption sync point. Every
    process must call this at every step (the preemption check is collective)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any) -> bool:
    """Saves `state` as `step` now; returns False when `step` is already saved. With
    `async_save` this returns once the arrays are on the host (the caller may then donate them).
    Raises CheckpointSaveError when this or the previous asynchronous save failed."""
    if step in self._manager.all_steps():
      return False
    self.wait()
    if not self._steps_on_disk():
      raise self._save_error(step)
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state)}),
          force=True)
    except _IO_ERRORS as e:
      raise self._save_error(step, e) from e
    self._pending_step, self._pending_since = step, time.monotonic()
    logging.info('Saving training checkpoint for step %d to %s.', step, self._directory)
    return True

  def finish_overdue_save(self, step: int) -> None:
    """Waits for the pending asynchronous save at its step + save_every // 2 (at least 1), so
    that a kill -9 loses at most 1.5 intervals, not 2 (a save competing with the steps for the
    host can outlast an interval). Every process calls this at every step (it is collective)."""
    if self._pending_step is None or step < self._pending_step + max(1, self._save_every // 2):
      return
    pending, started, waited = self._pending_step, self._pending_since, time.monotonic()
    self.wait()
    now = time.monotonic()
    logging.info('The checkpoint of step %d is complete (%.2f s after it started; waited %.2f s '
                 'for it at step %d).', pending, now - started, now - waited, step)

  def latest_step(self) -> Optional[int]:
    """The newest completely written step, or None."""
    return self._manager.latest_step()

  def restore(self, abstract_state: Any, step: Optional[int] = None, *,
              set_aside_unrestorable: bool = False) -> Tuple[Any, int]:
    """Restores `(state, step)`: `step`, or by default the newest step that restores.

    `abstract_state` gives every leaf's shape, dtype and `sharding` to restore into (which may
    differ from the saved one). Without `step`, a step that fails is a warning and the previous
    one is tried; ValueError when none restores. With `set_aside_unrestorable`, the failed steps
    are renamed to `<step>.unrestorable` so that they can be saved again.
    """
    _check_has_shardings(abstract_state)
    if step is not None:
      if step not in self._manager.all_steps():
        raise FileNotFoundError(f'No training checkpoint for step {step} in {self._directory}; '
                                f'available steps: {sorted(self._manager.all_steps())}.')
      return self._restore_step(abstract_state, step)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'No complete training checkpoint in {self._directory}.')
    differences = self._layout_differences(abstract_state, steps[0])
    if differences:
      raise CheckpointMismatchError(
          f'The {len(steps)} training checkpoints in {self._directory} belong to another model '
          'config: their arrays differ from this run\'s state (saved -> now):\n  '
          + '\n  '.join(differences))
    failures = {}
    for candidate in steps:
      try:
        restored = self._restore_step(abstract_state, candidate)
      except _IO_ERRORS as e:
        failures[candidate] = describe_error(e)
        logging.warning('The training checkpoint for step %d in %s cannot be restored, trying '
                        'the previous one. The error: %s', candidate, self._directory,
                        failures[candidate])
        continue
      if set_aside_unrestorable and failures:
        self._set_aside(list(failures))
      return restored
    raise ValueError(
        f'None of the {len(steps)} training checkpoints in {self._directory} can be restored:\n'
        + '\n'.join(f'  step {s}: {error}' for s, error in failures.items())
        + f'\nRepair them, or move {self._directory} away to start from scratch.')

  def _restore_step(self, abstract_state: Any, step: int) -> Tuple[Any, int]:
    logging.info('Restoring training checkpoint for step %d from %s.', step, self._directory)
    error = None
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)}))
    except Exception as e:  # pylint: disable=broad-except
      # orbax wraps tensorstore's ValueError for truncated data in a bare Exception.
      error = e if isinstance(e, _IO_ERRORS) else e.__cause__
      if not isinstance(error, _IO_ERRORS):
        raise
    if not _on_all_processes(error is None):
      raise error or ValueError(f'Restoring step {step} failed on another process.')
    return restored[_STATE], step

  def saved_device_count(self, step: int) -> Optional[int]:
    """The number of devices of the mesh `step` was saved from; None when its metadata does not
    say."""
    for leaf in jax.tree.leaves(self._metadata(step)):
      mesh_shape = getattr(getattr(leaf, 'sharding', None), 'shape', None)
      if mesh_shape is not None:
        return int(np.prod(mesh_shape))
    return None

  def _layout_differences(self, abstract_state: Any, step: int, shown: int = 8) -> list:
    """How the arrays saved at `step` differ from `abstract_state` in names or shapes (at most
    `shown` lines); [] when they agree or the step's metadata cannot be read."""
    metadata = self._metadata(step)
    if metadata is None:
      return []
    saved, wanted = _shapes(metadata), _shapes(abstract_state)
    lines = [f'{key}: {saved[key]} -> {wanted[key]}'
             for key in sorted(saved.keys() & wanted.keys()) if saved[key] != wanted[key]]
    lines += [f'{key}: (absent) -> {wanted[key]}' for key in sorted(wanted.keys() - saved.keys())]
    lines += [f'{key}: {saved[key]} -> (absent)' for key in sorted(saved.keys() - wanted.keys())]
    params = [line for line in lines if line.startswith('params.')]
    lines = params or lines  # The optimizer state mirrors the params.
    return lines[:shown] + ([f'... and {len(lines) - shown} more'] if len(lines) > shown else [])

  def _metadata(self, step: int) -> Any:
    """orbax's metadata of the state saved at `step` (shapes, shardings); None if unreadable."""
    try:
      return ocp.StandardCheckpointHandler().metadata(
          epath.Path(self._directory) / str(step) / _STATE)
    except _IO_ERRORS:
      return None

  def _set_aside(self, steps) -> None:
    if jax.process_index() == 0:
      for step in steps:
        source = epath.Path(self._directory) / str(step)
        target = source.with_name(f'{step}{_UNRESTORABLE_SUFFIX}')
        suffix = 1
        while target.exists():
          target, suffix = source.with_name(f'{step}{_UNRESTORABLE_SUFFIX}{suffix}'), suffix + 1
        source.rename(target)
        logging.warning('Renamed the unrestorable checkpoint %s to %s.', source, target)
    multihost_utils.sync_global_devices('TrainCheckpointer:set_aside')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written and committed."""
    step, self._pending_step = self._pending_step, None
    try:
      self._manager.wait_until_finished()
    except _IO_ERRORS as e:
      raise self._save_error(step, e) from e

  def _steps_on_disk(self) -> bool:
    """Whether the folder (created by __init__) and the steps saved into it are still there:
    deleted during an asynchronous save, the folder is recreated by it, without those steps."""
    return epath.Path(self._directory).is_dir() and all(
        epath.Path(self._directory, str(s)).is_dir() for s in self._manager.all_steps())

  def _save_error(self, step: Optional[int],
                  cause: Optional[Exception] = None) -> CheckpointSaveError:
    self._save_failed = True
    what = f'the training checkpoint for step {step}' if step is not None else 'a checkpoint'
    if not self._steps_on_disk():
      return CheckpointSaveError(
          f'Saving {what} failed: {self._directory} was deleted (or replaced by a file) during '
          'the run, and with it the checkpoints of earlier steps. Run the same command to start '
          'again from the last checkpoint left, if any.')
    self._manager.reload()  # The steps on disk: orbax's own list may be off after a failure.
    latest = self._manager.latest_step()
    kept = (f'The last complete checkpoint (step {latest}) is kept.' if latest is not None
            else f'No complete checkpoint is left in {self._directory}.')
    return CheckpointSaveError(f'Saving {what} to {self._directory} failed: '
                               f'{describe_error(cause)} {kept}')

  def close(self) -> None:
    """Finishes pending saves and releases orbax's resources; after a CheckpointSaveError
    (already raised) it does nothing, since orbax would raise it again."""
    if self._save_failed:
      return
    self.wait()
    self._manager.close()

  def __enter__(self) -> 'TrainCheckpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def describe_error(error: BaseException, limit: int = 300) -> str:
  """An orbax / tensorstore error in one short line for the user: its first line, without
  tensorstore's JSON spec and Python object reprs ('<ParamInfo object at 0x...>')."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text.split(" [tensorstore_spec=")[0]
  text = re.sub(r'<?\b[\w.]+ object at 0x[0-9a-f]+>?', 'an array', text)
  return textwrap.shorten(text, limit)


def _shapes(tree: Any) -> dict:
  """`a.b.0.c` -> shape for each array of a state pytree or of its orbax metadata (which stores
  named tuples as dicts and tuples as lists, so keys are compared by name or index only)."""
  return {jax.tree_util.keystr(path, simple=True, separator='.'): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _on_all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (so that all fall back to the same step together)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _check_has_shardings(abstract_state: Any) -> None:
  missing = [jax.tree_util.keystr(path)
             for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
             if getattr(leaf, 'sharding', None) is None]
  if missing:
    raise ValueError(
        'abstract_state must give a sharding for every leaf (e.g. jax.ShapeDtypeStruct(shape, '
        f'dtype, sharding=...)); missing for: {", ".join(missing[:5])}'
        + (f' and {len(missing) - 5} more.' if len(missing) > 5 else '.'))

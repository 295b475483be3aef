"""The training loop: fine-tuning and pre-training with periodic evaluation and checkpoints.

`prepare(config, workdir)` does everything before the first step (config and workdir checks, the
step's memory check, restore or initialisation) and writes nothing before all of it has passed:
its errors are the user's to fix. `Run.train()` runs the steps. Resuming follows the loss curve
of an uninterrupted run (the data order starts at the restored step; the RNG is in the state).
What a signal, a kill, a non-finite loss or a reused workdir do: README.md, "When things go wrong".
"""
import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import compilation_cache
from vit_jax import evaluate
from vit_jax import flops
from vit_jax import hardware
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax import state_checkpoint
from vit_jax import trainer as trainer_lib
from vit_jax import workdir as workdir_lib
from vit_jax import xla_flags


class TrainingInterrupted(cli.Interrupted):
  """Training stopped on a signal after saving a checkpoint of the last finished step (the
  command exits with 128 + the signal number, vit_jax.cli)."""

  def __init__(self, signum: int, step: int, workdir: str):
    directory = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
    super().__init__(signum, f'Stopped by {signal.Signals(signum).name} after step {step}, '
                     f'saved to {directory}. Run the same command to resume.')


class NonFiniteError(FloatingPointError):
  """A step had a non-finite loss or gradient and config.nonfinite is 'stop'."""


class _Throughput:
  """images/s, MFU and ETA between two log points."""

  def __init__(self, config, num_classes, start_step):
    self._flops = flops.train_step_flops(config.model, config.pp.resolution, num_classes)
    self._peak = hardware.peak_flops(override=config.peak_flops)
    self._batch, self._total = config.batch, config.total_steps
    self._time, self._step = time.perf_counter(), start_step

  def measure(self, step):
    now = time.perf_counter()
    images_per_s = (step - self._step) * self._batch / max(now - self._time, 1e-9)
    self._time, self._step = now, step
    out = {'images_per_s': images_per_s,
           'eta_s': (self._total - step) * self._batch / max(images_per_s, 1e-9)}
    if self._peak:
      out['mfu'] = images_per_s * self._flops / (self._peak * jax.device_count())
    return out


class _StopSignals:
  """Turns the first SIGTERM / SIGINT into a request to stop after the current step.

  Only with one process: a signal reaching one of several processes cannot stop them all at the
  same step. There SIGTERM is left to JAX's preemption service, whose sync point (the same step
  on every process) `requested` reports as well.
  """
  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def __enter__(self) -> '_StopSignals':
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signum = signum
    signal.signal(signum, self._previous[signum])  # A second one acts at once.
    logging.warning('Received %s: stopping after the current step and its checkpoint (send it '
                    'again to stop at once).', signal.Signals(signum).name)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; every process must call this at every step."""
    if self.signum is None and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None


class _NonFiniteSteps:
  """The train steps' on-device `is_finite` flags, read on the host only by `check()`."""

  def __init__(self, policy: str, ckpt: state_checkpoint.TrainCheckpointer, directory: str):
    self._policy, self._ckpt, self._directory = policy, ckpt, directory
    self._pending = []

  def add(self, step: int, is_finite: jax.Array) -> None:
    self._pending.append((step, is_finite))

  def check(self) -> None:
    """Raises NonFiniteError ('stop') or logs ('skip') the steps whose update was dropped."""
    steps, flags = zip(*self._pending) if self._pending else ((), ())
    self._pending = []
    bad = [step for step, ok in zip(steps, jax.device_get(flags)) if not ok]
    if not bad:
      return
    if self._policy == 'skip':
      logging.warning('Skipped %d step(s) with a non-finite loss or gradient '
                      "(config.nonfinite='skip'): %s", len(bad), bad)
      return
    latest = self._ckpt.latest_step()
    kept = (f'the checkpoint of step {latest} in {self._directory} is kept' if latest is not None
            else 'no checkpoint was saved')
    raise NonFiniteError(
        f"Non-finite loss or gradient at step {bad[0]} (config.nonfinite='stop'): training "
        f'stopped, {kept}. Resume it with a lower config.base_lr (and '
        f"--config.allow_config_change=True), or set config.nonfinite='skip'.")


class _Profile:
  """A jax.profiler trace of `steps` train steps into WORKDIR/tensorboard (TensorBoard's profile
  tab), starting after the first WARMUP_STEPS steps of the run (compilation, first batches)."""
  WARMUP_STEPS = 2

  def __init__(self, steps: int, first_step: int, workdir: str):
    self._start = first_step + self.WARMUP_STEPS if steps > 0 else None
    self._stop = self._start + steps if steps > 0 else None
    self._directory = workdir_lib.path(workdir, workdir_lib.TENSORBOARD)
    self._tracing = False

  def after_step(self, step: int, state) -> None:
    if step == self._start:
      jax.block_until_ready(state)  # The trace holds only the profiled steps.
      jax.profiler.start_trace(self._directory)
      self._tracing = True
    elif step == self._stop:
      self.close(step, state)

  def close(self, step: int, state) -> None:
    """Ends the trace (if one runs) after `step`."""
    if self._tracing:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self._tracing = False
      logging.info('Wrote a profile of steps %d-%d to %s.', self._start + 1, step,
                   self._directory)


@dataclasses.dataclass
class Run:
  """A training run ready to go on from `step` (see `prepare`)."""
  trainer: trainer_lib.Trainer
  ckpt: state_checkpoint.TrainCheckpointer
  workdir: str
  state: Any
  step: int
  batches: Iterator[dict]
  lock: workdir_lib.Lock
  restore_cache_setting: Callable[[], None]  # compilation_cache.enable's.

  def train(self) -> dict:
    """Runs the remaining steps, saves the final checkpoint and model.npz; returns the final
    `evaluate.accuracies` (minival `eval_top1`, `test_top1`)."""
    try:
      with _StopSignals() as stop:
        state, eval_metrics = self._loop(stop)
        if not eval_metrics:  # Finished already (or stopped in its final evaluation).
          eval_metrics = self._final_accuracies(state, stop)
      # Full parameter values on every host (gathers FSDP shards across processes).
      params = multihost_utils.process_allgather(state['params'], tiled=True)
      params = self.trainer.released_params(jax.tree.map(np.asarray, params))
      if jax.process_index() == 0:
        checkpoint.save_npz(params, workdir_lib.path(self.workdir, workdir_lib.MODEL))
    finally:
      try:
        self.ckpt.close()
      finally:
        self.lock.release()
        self.restore_cache_setting()
    return eval_metrics

  def _loop(self, stop: _StopSignals):
    config, trainer, ckpt, state, step = (self.trainer.config, self.trainer, self.ckpt,
                                          self.state, self.step)
    writer = workdir_lib.MetricsWriter(self.workdir)
    schedule = optim.learning_rate_schedule(config)
    throughput = _Throughput(config, trainer.num_classes, step)
    nonfinite = _NonFiniteSteps(config.nonfinite, ckpt, self.workdir)
    profile = _Profile(config.profile_steps, step, self.workdir)
    eval_metrics = {}
    progress = tqdm.tqdm(total=config.total_steps, initial=step, unit='step',
                         disable=not (config.progress and jax.process_index() == 0))
    while step < config.total_steps:
      state, metrics = trainer.train_step(state, next(self.batches))
      step += 1
      progress.update()
      profile.after_step(step, state)
      nonfinite.add(step, metrics.pop('is_finite'))
      stopping = stop.requested(step)
      log = step % config.log_every == 0 or step == config.total_steps
      save = stopping or step == config.total_steps or ckpt.should_save(step)
      ckpt.finish_overdue_save(step)
      if log or save:
        nonfinite.check()
      if log:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}  # Of a skipped step.
        metrics.update(lr=float(schedule(step - 1)), **throughput.measure(step))
        writer.write(step, metrics)
        progress.set_postfix(loss=f'{metrics.get("loss", math.nan):.4f}',
                             lr=f'{metrics["lr"]:.2e}')
      if save:
        ckpt.save(step, state)
      if stopping:
        ckpt.wait()
        raise TrainingInterrupted(stop.signum, step, self.workdir)
      if step % config.eval_every == 0 or step == config.total_steps:
        eval_metrics = self._evaluate(state, step, stop)
        writer.write(step, eval_metrics)
    progress.close()
    profile.close(step, state)
    return state, eval_metrics

  def _evaluate(self, state, step: int, stop: _StopSignals) -> dict:
    """`evaluate.accuracies` after `step` (with the test split after the last step); a signal
    during it saves `step` (if not yet saved) and raises TrainingInterrupted, as during the
    steps: the same command then evaluates again."""
    try:
      return evaluate.accuracies(
          self.trainer, state['params'], with_test=step == self.trainer.config.total_steps,
          source=f'The model of step {step} in {self.workdir}',
          should_stop=lambda: stop.signum is not None)
    except evaluate.Stopped:
      self.ckpt.save(step, state)
      self.ckpt.wait()
      raise TrainingInterrupted(stop.signum, step, self.workdir) from None

  def _final_accuracies(self, state, stop: _StopSignals) -> dict:
    """The accuracies of a run restored at its last step; written to metrics.jsonl when its
    final evaluation is not there (a signal stopped it)."""
    metrics = self._evaluate(state, self.step, stop)
    if not any(event['step'] == self.step and 'eval_top1' in event
               for event in workdir_lib.read_metrics(self.workdir)):
      workdir_lib.MetricsWriter(self.workdir).write(self.step, metrics)
    return metrics


def _batches(config, trainer, step: int) -> Iterator[dict]:
  return input_pipeline.prefetch_to_mesh(
      input_pipeline.build_train_iterator(config, start_step=step,
                                          num_shards=jax.device_count()),
      sharding.batch_sharding(trainer.mesh), size=config.prefetch)


def _restore_or_init(trainer: trainer_lib.Trainer, ckpt: state_checkpoint.TrainCheckpointer,
                     workdir: str):
  """(state, step) restored from `ckpt` (a warning if saved on another device count), else fresh."""
  if ckpt.latest_step() is None:
    return trainer.initial_state(), 0
  try:
    state, step = ckpt.restore(trainer.abstract_state, set_aside_unrestorable=True)
  except state_checkpoint.CheckpointMismatchError as e:
    raise workdir_lib.mismatch_error(e, trainer.config, workdir) from e
  logging.info('Resumed from %s at step %d.', workdir, step)
  saved, now = ckpt.saved_device_count(step), trainer.mesh.devices.size
  if saved is not None and saved != now:
    logging.warning(
        'Resuming step %d on %d devices; it was saved by a run on %d. The run goes on correctly, '
        'but its loss curve departs from an uninterrupted run on %d devices: the training data '
        'is read as one shard per device (another order) and the batch is reduced in another '
        'order. Resume on %d devices to follow that curve.', step, now, saved, saved, saved)
  return state, step


def check_step_memory(trainer: trainer_lib.Trainer) -> None:
  """Compiles the train step (the loop reuses the executable) and checks its memory against
  hardware.memory_budget: ValueError when it does not fit (rather than a silent kill, exit 137),
  a warning when it nearly does."""
  compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch).compile()
  memory = hardware.xla_memory(compiled)
  if memory is None:
    return
  check = hardware.check_step_memory(memory, *hardware.memory_budget(), trainer.config)
  if not check.fits:
    raise ValueError(f'Out of memory: {check.message}')
  if check.close:
    logging.warning('Close to the memory limit: %s', check.message)


def prepare(config: ml_collections.ConfigDict, workdir: str, *,
            take_over_lock: bool = False) -> Run:
  """Checks the config and workdir, holds the workdir, restores WORKDIR/checkpoints or
  initialises the state and builds the input pipeline; only then writes config.json.

  Raises ValueError / OSError for what the user must fix: config, data, paths, checkpoints, a
  workdir in use (`take_over_lock`: take over the lock of a run gone on another host); a start
  that fails leaves the workdir as it was.
  """
  input_pipeline.check_and_complete(config)
  workdir_lib.check_config(config, workdir)
  xla_flags.check_host_allocator()
  models.check_remat_layout(config.model)
  hardware.check_accelerator(config.model)
  hardware.check_attention_impl(config.model, jax.default_backend())
  lock = workdir_lib.lock(workdir, take_over=take_over_lock)
  ckpt = restore_cache_setting = None
  try:
    restore_cache_setting = compilation_cache.enable(config, workdir)
    trainer = trainer_lib.Trainer(config, config.num_classes)
    check_step_memory(trainer)
    ckpt = state_checkpoint.TrainCheckpointer(
        workdir_lib.path(workdir, workdir_lib.CHECKPOINTS), save_every=config.checkpoint_every,
        keep=config.keep_checkpoints)
    state, step = _restore_or_init(trainer, ckpt, workdir)
    batches = _batches(config, trainer, step)
    workdir_lib.rewind_metrics(workdir, step)
    workdir_lib.write_config(config, workdir)
  except BaseException:
    if ckpt is not None:
      ckpt.close()
    lock.release(failed_start=True)
    if restore_cache_setting is not None:
      restore_cache_setting()
    raise
  return Run(trainer, ckpt, workdir, state, step, batches, lock, restore_cache_setting)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from WORKDIR/checkpoints when present); returns the final eval metrics."""
  return prepare(config, workdir).train()

"""Top-1 accuracy over a whole eval split (every example exactly once, padding masked out)."""
from typing import Callable, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import output_check
from vit_jax import sharding
from vit_jax import state_checkpoint
from vit_jax import trainer as trainer_lib
from vit_jax import workdir as workdir_lib


class Stopped(Exception):
  """Evaluation stopped early because `should_stop` said so (a signal during training)."""


def top1(trainer, params, split: Optional[str] = None, *, source: str = 'The model',
         should_stop: Callable[[], bool] = lambda: False) -> float:
  """Accuracy of `params` on `split` (default `trainer.config.eval_split`), with the trainer's
  jitted eval step. NonFiniteOutputError (naming `source`, the checkpoint) at the first batch
  with an Inf or NaN logit; Stopped as soon as `should_stop()` after a batch."""
  config = trainer.config
  split = split or config.eval_split
  batches = input_pipeline.prefetch_to_mesh(
      input_pipeline.build_eval_iterator(config, split=split),
      sharding.batch_sharding(trainer.mesh), size=config.prefetch)
  correct = count = 0.0
  for batch in batches:
    out = trainer.eval_step(params, batch)
    if float(out['nonfinite']):
      _raise_nonfinite(trainer, params, batch, int(out['nonfinite']), source, split)
    correct += float(out['correct'])
    count += float(out['count'])
    if should_stop():
      raise Stopped(f'Evaluation of {split!r} stopped after {int(count)} images.')
  if not count:
    raise ValueError(f'Split {split!r} of {config.dataset!r} is empty.')
  return correct / count


def _raise_nonfinite(trainer, params, batch, count: int, source: str, split: str) -> None:
  """Raises the NonFiniteOutputError of a batch, naming the first non-finite layer where this
  process holds the whole model (one process) and the failing image."""
  what = f'logits on {trainer.config.dataset} {split}'
  if jax.process_count() == 1:
    images = np.asarray(batch['image'].addressable_data(0))
    model, host_params = trainer.model, jax.device_get(params)
    logits = model.apply({'params': host_params}, images, train=False)
    output_check.check_finite(np.asarray(logits), source, what=what, model=model,
                              params=host_params, images=images)
  output_check.raise_nonfinite(source, what, count, int(batch['mask'].shape[0]))


def accuracies(trainer, params, *, with_test: bool, source: str = 'The model',
               should_stop: Callable[[], bool] = lambda: False) -> dict:
  """`eval_top1` on config.eval_split (the minival of fine-tuning configs) and, `with_test`,
  `test_top1` on config.test_split (when set): the split reported once at the end. `source`
  and `should_stop` as in `top1`."""
  metrics = {'eval_top1': top1(trainer, params, source=source, should_stop=should_stop)}
  if with_test and trainer.config.test_split:
    metrics['test_top1'] = top1(trainer, params, trainer.config.test_split, source=source,
                                should_stop=should_stop)
  return metrics


def checkpoint_params(trainer, path: str):
  """Params of a released-layout `.npz` or of a workdir's latest training checkpoint (a run in
  progress or interrupted has no model.npz yet: see vit_jax.workdir)."""
  if path.endswith('.npz'):
    return jax.device_put(trainer.load_released(path, keep_head=True),
                          trainer.state_shardings['params'])
  if not workdir_lib.is_workdir(path):
    raise FileNotFoundError(f'{path} is neither a released-layout .npz nor a training workdir.')
  directory = workdir_lib.path(path, workdir_lib.CHECKPOINTS)
  if not workdir_lib.is_workdir(directory):  # Checked first: the checkpointer creates it.
    raise FileNotFoundError(f'No training checkpoint under {directory}.')
  ckpt = state_checkpoint.TrainCheckpointer(directory, save_every=1, keep=1)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'No training checkpoint under {directory}.')
    state, step = ckpt.restore(trainer.abstract_state)
  except state_checkpoint.CheckpointMismatchError as e:
    raise workdir_lib.mismatch_error(e, trainer.config, path) from e
  finally:
    ckpt.close()
  checkpoint.check_weights(state['params'],
                           f'The training checkpoint of step {step} in {directory}')
  logging.info('Evaluating %s at step %d.', path, step)
  return state['params']


def run(config: ml_collections.ConfigDict, path: str) -> dict:
  """`--mode=eval`: `accuracies` of a checkpoint (`.npz` or workdir)."""
  input_pipeline.check_and_complete(config, training=False)
  trainer = trainer_lib.Trainer(config, config.num_classes)
  return accuracies(trainer, checkpoint_params(trainer, path), with_test=True,
                    source=f'Checkpoint {path}')

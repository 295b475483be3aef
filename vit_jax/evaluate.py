"""Top-1 accuracy over a whole eval split (every example exactly once, padding masked out)."""
from typing import Optional

from absl import logging
import jax
import ml_collections

from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import sharding
from vit_jax import state_checkpoint
from vit_jax import trainer as trainer_lib
from vit_jax import workdir as workdir_lib


def top1(trainer, params, split: Optional[str] = None) -> float:
  """Accuracy of `params` on `split` (default `trainer.config.eval_split`), with the trainer's
  jitted eval step."""
  config = trainer.config
  split = split or config.eval_split
  batches = input_pipeline.prefetch_to_mesh(
      input_pipeline.build_eval_iterator(config, split=split),
      sharding.batch_sharding(trainer.mesh), size=config.prefetch)
  correct = count = 0.0
  for batch in batches:
    out = trainer.eval_step(params, batch)
    correct += float(out['correct'])
    count += float(out['count'])
  if not count:
    raise ValueError(f'Split {split!r} of {config.dataset!r} is empty.')
  return correct / count


def accuracies(trainer, params, *, with_test: bool) -> dict:
  """`eval_top1` on config.eval_split (the minival of fine-tuning configs) and, `with_test`,
  `test_top1` on config.test_split (when set): the split reported once at the end."""
  metrics = {'eval_top1': top1(trainer, params)}
  if with_test and trainer.config.test_split:
    metrics['test_top1'] = top1(trainer, params, trainer.config.test_split)
  return metrics


def checkpoint_params(trainer, path: str):
  """Params of a released-layout `.npz` or of a workdir's latest training checkpoint (a run in
  progress or interrupted has no model.npz yet: see vit_jax.workdir)."""
  if path.endswith('.npz'):
    return jax.device_put(trainer.load_released(path, keep_head=True),
                          trainer.state_shardings['params'])
  directory = workdir_lib.path(path, workdir_lib.CHECKPOINTS)
  ckpt = state_checkpoint.TrainCheckpointer(directory, save_every=1, keep=1)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f'No training checkpoint under {directory}.')
  try:
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
  input_pipeline.check_and_complete(config)
  trainer = trainer_lib.Trainer(config, config.num_classes)
  return accuracies(trainer, checkpoint_params(trainer, path), with_test=True)

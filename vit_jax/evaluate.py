"""Top-1 accuracy over a whole eval split (every example exactly once, padding masked out)."""
import os

from absl import logging
import jax
import ml_collections

from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import sharding
from vit_jax import train_checkpoint
from vit_jax import trainer as trainer_lib


def top1(trainer, params) -> float:
  """Accuracy of `params` on `trainer.config.eval_split`, with the trainer's jitted eval step."""
  config = trainer.config
  batches = input_pipeline.prefetch_to_mesh(
      input_pipeline.build_eval_iterator(config), sharding.batch_sharding(trainer.mesh),
      size=config.prefetch)
  correct = count = 0.0
  for batch in batches:
    out = trainer.eval_step(params, batch)
    correct += float(out['correct'])
    count += float(out['count'])
  if not count:
    raise ValueError(f'config.eval_split={config.eval_split!r} of {config.dataset!r} is empty.')
  return correct / count


def checkpoint_params(trainer, path: str):
  """Params of a released-layout `.npz` or of a workdir's latest training checkpoint."""
  if path.endswith('.npz'):
    return jax.device_put(trainer.load_released(path, keep_head=True),
                          trainer.state_shardings['params'])
  ckpt = train_checkpoint.TrainCheckpointer(os.path.join(path, 'checkpoints'), save_every=1,
                                            keep=1)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f'No training checkpoint under {path}/checkpoints.')
  try:
    state, _, step = ckpt.restore(trainer.abstract_state)
  except train_checkpoint.CheckpointMismatchError as e:
    raise trainer_lib.mismatch_error(e, trainer.config, path) from e
  finally:
    ckpt.close()
  checkpoint.check_weights(state['params'],
                           f'The training checkpoint of step {step} in {path}/checkpoints')
  logging.info('Evaluating %s at step %d.', path, step)
  return state['params']


def run(config: ml_collections.ConfigDict, path: str) -> float:
  """`--mode=eval`: top-1 of a checkpoint (`.npz` or workdir) on `config.eval_split`."""
  info = input_pipeline.get_dataset_info(config)
  config.num_classes = config.num_classes or info.num_classes
  trainer = trainer_lib.Trainer(config, config.num_classes)
  return top1(trainer, checkpoint_params(trainer, path))

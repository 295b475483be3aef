"""Tiny configs, trainers and batches shared by the training tests (and their subprocesses)."""
import ml_collections
import numpy as np

from vit_jax import config_lib
from vit_jax import trainer as trainer_lib

NUM_CLASSES = 10


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config_lib.set_model(config, 'micro')
  config.model.patches.size = (4, 4)
  config.pp.resolution = 16
  config.num_classes = NUM_CLASSES
  config.batch = 32
  config.batch_eval = 32
  config.optimizer = 'adam'
  config.base_lr = 1e-2
  config.warmup_steps = 0
  config.total_steps = 100
  config.weight_decay = 0.0
  for key, value in overrides.items():
    config[key] = value
  return config


def tiny_trainer(config) -> trainer_lib.Trainer:
  return trainer_lib.Trainer(config, NUM_CLASSES)


def synthetic_batches(config, steps: int, seed: int = 0):
  """Fixed global batches whose label is readable from the image (so a model can learn it)."""
  rng = np.random.default_rng(seed)
  r = config.pp.resolution
  for _ in range(steps):
    labels = rng.integers(0, NUM_CLASSES, size=config.batch).astype(np.int32)
    images = rng.uniform(-1, 1, size=(config.batch, r, r, 3)).astype(np.float32) * 0.1
    images[np.arange(config.batch), labels, :, 0] += 1.0
    yield {'image': images, 'label': labels}

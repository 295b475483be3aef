"""A tiny, quick run for the command-line runs of tests/test_fault_tolerance.py.

    python -m vit_jax.main --workdir=/tmp/w --config=tests/fault_tolerance_config.py

Fashion-MNIST (offline) at 16px, a one-block ViT, batch 16; every step is logged so that resumed
loss curves can be compared step by step.
"""
from vit_jax import config_lib

TOTAL_STEPS = 250  # Not a multiple of CHECKPOINT_EVERY: tests count on a last, extra save.
CHECKPOINT_EVERY = 30


def get_config():
  config = config_lib.base_config()
  config_lib.set_model(config, 'micro')
  config_lib.set_dataset(config, 'fashion_mnist')
  config.model.patches.size = (4, 4)
  config.model.transformer.num_layers = 1
  config.pp.resolution = 16
  config.train_split = 'train[:512]'
  config.eval_split = 'test[:32]'
  config.test_split = 'test[32:64]'
  config.batch = 16
  config.batch_eval = 32
  config.shuffle_buffer = 512
  config.optimizer = 'adam'
  config.base_lr = 2e-3
  config.decay_type = 'linear'
  config.warmup_steps = 5
  config.total_steps = TOTAL_STEPS
  config.log_every = 1
  config.eval_every = TOTAL_STEPS
  config.checkpoint_every = CHECKPOINT_EVERY
  config.keep_checkpoints = 2
  config.progress = False
  return config

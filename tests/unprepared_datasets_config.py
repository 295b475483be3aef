"""Configs on the unprepared TFDS datasets of tests/unprepared_datasets.py.

    --config=tests/unprepared_datasets_config.py:NAME   NAME: download | manual | generated
"""
from tests import unprepared_datasets  # pylint: disable=unused-import  # Registers the builders.
from vit_jax import config_lib


def get_config(name: str = 'download'):
  config = config_lib.base_config()
  config_lib.set_model(config, 'micro')
  config.dataset = f'unprepared_{name}_test'
  config.eval_split = 'train'
  config.pp.resolution = 16
  config.batch = config.batch_eval = 8
  config.total_steps = 2
  config.warmup_steps = 1
  return config

"""Fine-tuning an AugReg checkpoint ("How to train your ViT?") by its short model name.

    python -m vit_jax.weights fetch augreg:B_16
    python -m vit_jax.main --workdir=/tmp/augreg_b16_cifar10 --config=configs/augreg.py:B_16,cifar10

`MODEL` is an AugReg short name (B_16, S_16, R26_S_32, ...: the best i21k pre-training by its
final validation accuracy, as the official configs/augreg.py selects it from the bucket's
index.csv, see vit_jax.checkpoint) or a full AugReg filename; the recipe is configs/vit.py's.
"""
import os

from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import model_configs


def get_config(arg: str = 'B_16,cifar10'):
  spec, dataset = config_lib.parse_arg(arg, defaults=('B_16', 'cifar10'))
  filename, model = checkpoint.resolve_augreg(spec)
  config = config_lib.base_config()
  config_lib.set_model(config, model)
  config_lib.set_dataset(config, dataset)
  config.pretrained_path = os.path.join('checkpoints', checkpoint.AUGREG, f'{filename}.npz')
  config.model.transformer.dropout_rate = 0.0  # No AugReg while fine-tuning.
  config.pp.resolution = model_configs.resolution_at_most(config.model, 384)
  return config

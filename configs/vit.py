"""Fine-tuning a released ImageNet-21k model (paper, appendix B.1.1).

    python -m vit_jax.main --workdir=/tmp/b16_cifar10 --config=configs/vit.py:b16,cifar10 \
        --config.pretrained_dir=checkpoints

The minival (`eval_split`) gives the periodic `eval_top1`; the test split is evaluated once at the
end (`test_top1`). `python -m vit_jax.sweep` picks the learning rate on minival as the paper does.

The argument is `MODEL,DATASET`: any name or alias of vit_jax.model_configs.MODEL_CONFIGS and any
dataset of vit_jax.input_pipeline (a tfds name or `folder:/path/to/images`).
"""
from vit_jax import config_lib
from vit_jax import model_configs


def get_config(arg: str = 'b16,cifar10'):
  model, dataset = config_lib.parse_arg(arg)
  config = config_lib.base_config()
  config_lib.set_model(config, model)
  config_lib.set_dataset(config, dataset)
  config.pretrained_dir = 'checkpoints'
  # The official recipe: SGD + momentum 0.9, no weight decay, clip at 1, batch 512, 500 warm-up
  # steps then cosine decay, the dataset's steps and minival (config_lib.DATASETS), 384px (378px
  # for /14 models), inception crop + flip for training, plain resize for evaluation, pixels
  # (x - 127.5) / 127.5.
  config.pp.train = 'inception'
  config.pp.eval = 'resize'
  config.pp.resolution = model_configs.resolution_at_most(config.model, 384)
  return config

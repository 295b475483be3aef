"""Pre-training from scratch (paper, Table 3).

    python -m vit_jax.main --workdir=/tmp/b16_i21k --config=configs/pretrain.py:b16,imagenet2012

Adam (0.9, 0.999) with decoupled weight decay, batch 4096 (any device count: raise
`--config.accum_steps` when it does not fit), 10k warm-up steps then linear decay, grad clip 1,
Inception crop + flip at 224px. Base LR, weight decay and dropout follow Table 3's ImageNet-21k row
(LR 1e-3, wd 0.03, dropout 0.1) unless the dataset is ImageNet-1k (LR 3e-3, wd 0.3, cosine).
"""
from vit_jax import config_lib


def get_config(arg: str = 'b16,imagenet2012'):
  model, dataset = config_lib.parse_arg(arg, defaults=('b16', 'imagenet2012'))
  config = config_lib.base_config()
  config_lib.set_model(config, model)
  config_lib.set_dataset(config, dataset)
  config.pp.train = 'inception'
  config.pp.eval = 'central_crop'
  config.pp.resolution = 224
  config.batch = 4096
  config.batch_eval = 4096
  config.shuffle_buffer = 250_000
  config.optimizer = 'adam'
  config.grad_norm_clip = 1.0
  config.warmup_steps = 10_000
  if config.model.transformer:  # A BiT ResNet has no dropout and no representation layer.
    config.model.transformer.dropout_rate = 0.1
    # Representation layer as in the released ImageNet-21k checkpoints.
    config.model.representation_size = config.model.hidden_size
  if dataset == 'imagenet2012':  # Table 3, last row: 300 epochs.
    config.base_lr, config.weight_decay, config.decay_type = 3e-3, 0.3, 'cosine'
    config.total_steps = 300 * 1_281_167 // config.batch
  else:  # ImageNet-21k row: 90 epochs of 14,197,122 images.
    config.base_lr, config.weight_decay, config.decay_type = 1e-3, 0.03, 'linear'
    config.total_steps = 90 * 14_197_122 // config.batch
  config.eval_every = 5_000
  config.checkpoint_every = 2_000
  return config

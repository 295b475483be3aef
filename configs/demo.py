"""The paper's protocol in miniature, offline on Fashion-MNIST (README command 1).

`configs/demo.py:pretrain` pre-trains a small ViT from scratch at 16x16 (Adam, linear decay, a
tanh representation layer, as the ImageNet-21k models); `configs/demo.py:finetune` fine-tunes its
`model.npz` at 28x28 with SGD + cosine decay through `load_pretrained`, so the position
embeddings are interpolated from a 4x4 to a 7x7 grid and the head and pre-logits are replaced.
`python -m vit_jax.demo` runs both and evaluates.
"""
from vit_jax import config_lib
from vit_jax import model_configs

HIDDEN = 96


def demo_model():
  model = model_configs.get_model_config('testing')
  model.model_name = 'ViT-demo_4'
  model.patches.size = (4, 4)
  model.hidden_size = HIDDEN
  model.transformer.mlp_dim = 2 * HIDDEN
  model.transformer.num_heads = 3
  model.transformer.num_layers = 4
  return model


def get_config(arg: str = 'pretrain'):
  if arg not in ('pretrain', 'finetune'):
    raise ValueError(f"configs/demo.py takes 'pretrain' or 'finetune', not {arg!r}.")
  config = config_lib.base_config()
  config_lib.set_dataset(config, 'fashion_mnist')
  config.model_name = 'ViT-demo_4'
  config.model = demo_model()
  config.batch = 256
  config.batch_eval = 1000
  config.shuffle_buffer = 20_000
  config.log_every = 50
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  if arg == 'pretrain':
    config.model.representation_size = HIDDEN
    config.pp.resolution = 16
    config.optimizer = 'adam'
    config.base_lr = 2e-3
    config.weight_decay = 1e-4
    config.decay_type = 'linear'
    config.warmup_steps = 100
    config.total_steps = 940  # 4 epochs
    config.eval_every = 470
  else:
    config.pp.resolution = 28
    config.optimizer = 'sgd'
    config.base_lr = 0.03
    config.warmup_steps = 50
    config.total_steps = 470  # 2 epochs
    config.eval_every = 470
  return config

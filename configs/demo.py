"""The paper's protocol in miniature, offline on Fashion-MNIST (README command 1).

`configs/demo.py:pretrain` pre-trains a small ViT (7x7 patches, hidden 64, global average
pooling) from scratch at 21x21 (Adam, linear decay, a tanh representation layer, as the
ImageNet-21k models); `configs/demo.py:finetune` fine-tunes its `model.npz` at the native 28x28
through `load_pretrained`, so the position embeddings are interpolated from a 3x3 to a 4x4 grid
and the head and pre-logits are replaced. `python -m vit_jax.demo` runs both and evaluates on
minival and the test set (README, "The demo, measured").

Most of the budget goes to fine-tuning: at 28px every object appears 4/3 larger to the 7x7
patch embedding than at 21px, which costs the pre-trained model most of its accuracy before
any fine-tuning step (README), so fine-tuning relearns much of the model. Adam rather than the
paper's SGD for the same reason: SGD with momentum relearns that more slowly.
"""
from vit_jax import config_lib
from vit_jax import model_configs

HIDDEN = 64
PATCH = 7


def demo_model():
  model = model_configs.get_model_config('micro')
  model.model_name = 'ViT-demo_7'
  model.patches.size = (PATCH, PATCH)
  model.hidden_size = HIDDEN
  model.transformer.mlp_dim = 4 * HIDDEN
  model.transformer.num_heads = 2
  model.transformer.num_layers = 4
  model.classifier = 'gap'
  return model


def get_config(arg: str = 'pretrain'):
  if arg not in ('pretrain', 'finetune'):
    raise ValueError(f"configs/demo.py takes 'pretrain' or 'finetune', not {arg!r}.")
  config = config_lib.base_config()
  config_lib.set_dataset(config, 'fashion_mnist')
  config.model = demo_model()
  config.batch = 128
  config.batch_eval = 1000
  config.shuffle_buffer = 20_000
  config.log_every = 100
  config.checkpoint_every = 1000
  config.keep_checkpoints = 2
  config.optimizer = 'adam'
  config.base_lr = 2e-3
  if arg == 'pretrain':
    config.model.representation_size = HIDDEN
    config.pp.resolution = 21
    config.weight_decay = 1e-4
    config.decay_type = 'linear'
    config.warmup_steps = 100
    config.total_steps = 1000  # 2.1 epochs
  else:
    config.pp.resolution = 28
    config.decay_type = 'cosine'
    config.warmup_steps = 50
    config.total_steps = 5000  # 10.7 epochs
  # Random flips only (a random crop of the whole image): at these sizes a random crop costs more
  # accuracy than it gains.
  config.pp.train = 'resize_crop'
  config.pp.resize = config.pp.resolution
  config.eval_every = config.total_steps
  return config

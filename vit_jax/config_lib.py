"""Building blocks of the experiment configs in `configs/`, and their validation.

`configs/vit.py` (fine-tuning), `configs/pretrain.py` (pre-training) and `configs/demo.py`
assemble their ConfigDicts from these functions, so every recipe shares one set of field names.
"""
import json
from typing import Any, Mapping

import ml_collections

from vit_jax import model_configs

# Fine-tuning schedules and splits of the paper (Table 4, appendix B.1.1).
DATASETS = {
    'cifar10': dict(train_split='train', eval_split='test', total_steps=10_000),
    'cifar100': dict(train_split='train', eval_split='test', total_steps=10_000),
    'imagenet2012': dict(train_split='train', eval_split='validation', total_steps=20_000),
    # ImageNet-v2 has only a test split: it is an evaluation set (`--mode=eval`).
    'imagenet_v2': dict(train_split='test', eval_split='test', total_steps=20_000),
    'oxford_iiit_pet': dict(train_split='train', eval_split='test', total_steps=500),
    'oxford_flowers102': dict(train_split='train+validation', eval_split='test',
                              total_steps=500),
    'fashion_mnist': dict(train_split='train', eval_split='test', total_steps=2_000),
}
DEFAULT_DATASET = dict(train_split='train', eval_split='test', total_steps=10_000)

# Fields a resumed run may change without changing what it computes (besides accumulation's
# rounding): logging, evaluation, checkpointing, input plumbing, sharding and where the initial
# weights came from (a resumed run reads its training checkpoint instead). Any other difference
# from WORKDIR/config.json (model, data, recipe, total_steps, ...) is refused unless
# config.allow_config_change is set.
RESUMABLE_FIELDS = frozenset({
    'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'progress', 'prefetch',
    'eval_split', 'batch_eval', 'peak_flops', 'data_dir', 'cache', 'pretrained_dir',
    'pretrained_path', 'accum_steps', 'sharding', 'nonfinite', 'allow_config_change',
})


# The smallest crop of 'inception' preprocessing, as a fraction of the image area: `pp.area_min`
# here, and input_pipeline's value for a `pp` without the field.
DEFAULT_AREA_MIN = 0.05


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with the fine-tuning recipe's defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'ViT-B_16'
  c.model = model_configs.get_model_config(c.model_name)
  c.num_classes = ml_collections.FieldReference(None, field_type=int)
  c.head_bias_init = 0.0
  # Data (vit_jax.input_pipeline).
  c.dataset = 'cifar10'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = 'train'
  c.eval_split = 'test'
  # `resize`: the size before the random (train) or central (eval) crop; None: resolution * 8/7.
  # `area_min`: see DEFAULT_AREA_MIN.
  c.pp = ml_collections.ConfigDict({'train': 'finetune', 'eval': 'resize', 'resolution': 384,
                                    'resize': ml_collections.FieldReference(None, field_type=int),
                                    'area_min': DEFAULT_AREA_MIN})
  c.batch = 512
  c.batch_eval = 512
  c.shuffle_buffer = 50_000
  c.prefetch = 2
  # Optimisation.
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 0.0
  c.base_lr = 0.03
  c.decay_type = 'cosine'
  c.warmup_steps = 500
  c.total_steps = 10_000
  c.grad_norm_clip = 1.0
  c.accum_steps = 1
  c.loss = 'softmax'
  c.label_smoothing = 0.0
  # Compute and sharding.
  c.dtype = 'float32'
  c.sharding = 'replicate'
  c.peak_flops = ml_collections.FieldReference(None, field_type=float)
  # Initialisation: `pretrained_path`, else `pretrained_dir/<model_name>.npz`, else scratch.
  c.pretrained_dir = ml_collections.FieldReference(None, field_type=str)
  c.pretrained_path = ml_collections.FieldReference(None, field_type=str)
  # Loop.
  c.log_every = 50
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.progress = True
  # A step with a non-finite loss or gradient is never applied; 'stop' then ends the run with an
  # error naming the step (its checkpoints stay as they were), 'skip' goes on and logs it.
  c.nonfinite = 'stop'
  # Resuming a workdir with a config that differs from its config.json beyond RESUMABLE_FIELDS.
  c.allow_config_change = False
  return c


def set_model(config: ml_collections.ConfigDict, name: str) -> None:
  model = model_configs.get_model_config(name)
  config.model_name = model.model_name
  config.model = model


def set_dataset(config: ml_collections.ConfigDict, name: str) -> None:
  settings = DATASETS.get(name, DEFAULT_DATASET)
  config.dataset = name
  config.train_split = settings['train_split']
  config.eval_split = settings['eval_split']
  config.total_steps = settings['total_steps']


def parse_arg(arg: str, defaults=('b16', 'cifar10')):
  """'b16,cifar10' -> ('b16', 'cifar10'); missing parts take the defaults."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  if len(parts) > 2:
    raise ValueError(f'Config argument {arg!r}: expected "MODEL,DATASET".')
  parts += list(defaults[len(parts):])
  return parts[0], parts[1]


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> None:
  """Raises ValueError naming the field for configs that cannot run, before any compilation."""
  accum = config.accum_steps
  if accum < 1 or config.batch % accum:
    raise ValueError(f'config.batch={config.batch} is not divisible by '
                     f'config.accum_steps={accum}.')
  micro = config.batch // accum
  if micro % num_devices:
    raise ValueError(f'config.batch={config.batch} / config.accum_steps={accum} = {micro} '
                     f'is not divisible by the {num_devices} devices.')
  if config.batch_eval % num_devices or config.batch_eval % process_count:
    raise ValueError(f'config.batch_eval={config.batch_eval} is not divisible by the '
                     f'{num_devices} devices.')
  # A ResNet alone (no transformer) pools its feature map: any resolution fits it.
  patch = config.model.patches.size[0] if config.model.get('transformer') else 1
  stride = _resnet_stride(config.model) if config.model.get('transformer') else 1
  if config.pp.resolution % (patch * stride):
    raise ValueError(
        f'config.pp.resolution={config.pp.resolution} is not a multiple of the patch size '
        f'{patch} (x {stride} ResNet stride) of {config.model_name}.')
  for field, choices in (('loss', ('softmax', 'sigmoid')), ('dtype', ('float32', 'bfloat16')),
                         ('optimizer', ('sgd', 'adam')), ('decay_type', ('cosine', 'linear')),
                         ('sharding', ('replicate', 'fsdp')), ('nonfinite', ('stop', 'skip'))):
    if config[field] not in choices:
      raise ValueError(f'config.{field}={config[field]!r}; expected one of {choices}.')
  if not 0 <= config.warmup_steps < config.total_steps:
    raise ValueError(f'config.warmup_steps={config.warmup_steps} must be in '
                     f'[0, config.total_steps={config.total_steps}).')


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """`field: saved -> current` for each differing field (JSON dicts) outside RESUMABLE_FIELDS.

  A field that `saved` lacks (added to base_config after it was written) has its default value.
  """
  defaults = _flatten(json.loads(base_config().to_json_best_effort()))
  saved, current = {**defaults, **_flatten(saved)}, _flatten(current)
  missing = '(absent)'
  return [f'{key}: {saved.get(key, missing)!r} -> {current.get(key, missing)!r}'
          for key in sorted(saved.keys() | current.keys())
          if key not in RESUMABLE_FIELDS and saved.get(key, missing) != current.get(key, missing)]


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _resnet_stride(model: ml_collections.ConfigDict) -> int:
  if model.get('resnet') is None:
    return 1
  return 4 * 2**max(len(model.resnet.num_layers) - 1, 0)

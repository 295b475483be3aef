"""Building blocks of the experiment configs in `configs/`, and their validation.

`configs/vit.py` (fine-tuning), `configs/pretrain.py` (pre-training) and `configs/demo.py`
assemble their ConfigDicts from these functions, so every recipe shares one set of field names.
"""
import json
import math
import operator
from typing import Any, Mapping

from absl import logging
import ml_collections

from vit_jax import model_configs
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax import trainer as trainer_lib

# Fine-tuning schedules and splits of the paper (Table 4, appendix B.1.1). `train_split` is what
# the model trains on, `eval_split` the held-out minival of the training data (periodic eval,
# learning-rate selection: 2% of train, ImageNet 1%, as the official configs), `test_split` the
# split reported at the end (`test_top1`). VTAB-1k tasks: 800 training and 200 minival examples.
def _minival(steps: int, classes: int, test: str = 'test', held_out: int = 2,
             train: tuple[str, ...] = ('train',)) -> dict:
  kept = 100 - held_out
  return dict(train_split='+'.join(f'{name}[:{kept}%]' for name in train),
              eval_split='+'.join(f'{name}[{kept}%:]' for name in train),
              test_split=test, total_steps=steps, num_classes=classes)


def _vtab(classes: int) -> dict:
  return dict(train_split='train[:800]', eval_split='train[800:1000]', test_split='test',
              total_steps=2_500, num_classes=classes)


# `num_classes` is the dataset's (TFDS), for what must not open it (`vit_jax.plan`); a run reads
# it from the dataset itself.
DATASETS = {
    'cifar10': _minival(10_000, 10),
    'cifar100': _minival(10_000, 100),
    'imagenet2012': _minival(20_000, 1000, test='validation', held_out=1),
    # ImageNet-v2 has only a test split: it is an evaluation set (`--mode=eval`).
    'imagenet_v2': dict(train_split='test', eval_split='test', test_split='test',
                        total_steps=20_000, num_classes=1000),
    'oxford_iiit_pet': _minival(500, 37),
    'oxford_flowers102': _minival(500, 102, train=('train', 'validation')),
    'fashion_mnist': _minival(2_000, 10),
    'caltech101': _vtab(102),
    'dtd': _vtab(47),
    'svhn_cropped': _vtab(10),
    'patch_camelyon': _vtab(2),
}
# Any other TFDS dataset and every `folder:` dataset.
DEFAULT_DATASET = _minival(10_000, None)

# Fields a resumed run may change without changing what it computes (besides accumulation's
# rounding); any other difference from WORKDIR/config.json is refused unless
# config.allow_config_change is set.
RESUMABLE_FIELDS = frozenset({
    'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'progress', 'prefetch',
    'eval_split', 'test_split', 'batch_eval', 'peak_flops', 'data_dir', 'cache', 'pretrained_dir',
    'pretrained_path', 'accum_steps', 'sharding', 'nonfinite', 'allow_config_change',
    'tfds_manual_dir', 'profile_steps', 'compilation_cache_dir',
})

# Fields of older config.json files that base_config no longer has; ignored in comparisons.
REMOVED_FIELDS = frozenset({'model_name'})


# The smallest crop of 'inception' preprocessing, as a fraction of the image area: `pp.area_min`
# here, and input_pipeline's value for a `pp` without the field.
DEFAULT_AREA_MIN = 0.05
# The names of vit_jax.preprocessing.TRAIN_CROPS and EVAL_RESIZES, here because validation must
# not import TensorFlow (the benchmark runs without it); tests/test_train.py checks they agree.
PP_TRAIN = ('inception', 'resize_crop')
PP_EVAL = ('resize', 'central_crop')


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with the fine-tuning recipe's defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_configs.get_model_config('ViT-B_16')  # Its name: config.model.model_name.
  c.num_classes = ml_collections.FieldReference(None, field_type=int)
  c.head_bias_init = 0.0
  # Data (vit_jax.input_pipeline; the fields: docs/ARCHITECTURE.md, "Configuration").
  c.dataset = 'cifar10'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.folder_test_fraction = 0.1
  c.cache = ml_collections.FieldReference(None, field_type=bool)
  # Where the files of datasets that TFDS cannot download (imagenet2012) were put by hand.
  c.tfds_manual_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = 'train'
  c.eval_split = 'test'
  c.test_split = ''
  # The official fine-tuning pipeline. `resize`: the size before the random (train) or central
  # (eval) crop; None: resolution * 8/7.
  c.pp = ml_collections.ConfigDict({'train': 'inception', 'eval': 'resize', 'resolution': 384,
                                    'resize': ml_collections.FieldReference(None, field_type=int),
                                    'area_min': DEFAULT_AREA_MIN})
  c.batch = 512
  c.batch_eval = 512
  c.shuffle_buffer = 50_000
  c.prefetch = 2
  _add_training_fields(c)
  return c


def _add_training_fields(c: ml_collections.ConfigDict) -> None:
  """base_config's optimisation, compute, initialisation and loop fields."""
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
  # Initialisation: `pretrained_path`, else `pretrained_dir/<model.model_name>.npz`, else scratch.
  c.pretrained_dir = ml_collections.FieldReference(None, field_type=str)
  c.pretrained_path = ml_collections.FieldReference(None, field_type=str)
  # Loop.
  c.log_every = 50
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.progress = True
  # > 0: a jax.profiler trace of this many steps after warm-up, in WORKDIR/tensorboard.
  c.profile_steps = 0
  # A step with a non-finite loss or gradient is never applied; 'stop' then ends the run with an
  # error naming the step (its checkpoints stay as they were), 'skip' goes on and logs it.
  c.nonfinite = 'stop'
  # JAX's persistent compilation cache (vit_jax.compilation_cache): None = WORKDIR/
  # compilation_cache, '' = off, else a directory (local or gs://).
  c.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)
  # Resuming a workdir with a config that differs from its config.json beyond RESUMABLE_FIELDS.
  c.allow_config_change = False


def set_model(config: ml_collections.ConfigDict, name: str) -> None:
  config.model = model_configs.get_model_config(name)


def set_dataset(config: ml_collections.ConfigDict, name: str) -> None:
  settings = DATASETS.get(name, DEFAULT_DATASET)
  config.dataset = name
  for field in ('train_split', 'eval_split', 'test_split', 'total_steps'):
    config[field] = settings[field]


def parse_arg(arg: str, defaults=('b16', 'cifar10')):
  """'b16,cifar10' -> ('b16', 'cifar10'); missing parts take the defaults."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  if len(parts) > 2:
    raise ValueError(f'Config argument {arg!r}: expected "MODEL,DATASET".')
  parts += list(defaults[len(parts):])
  return parts[0], parts[1]


# The choices of a run config: field -> the table (next to the code it selects) of its values.
CHOICES = {
    'optimizer': optim.OPTIMIZERS, 'decay_type': optim.DECAYS, 'loss': trainer_lib.LOSSES,
    'sharding': sharding.STRATEGIES, 'dtype': models.DTYPES, 'nonfinite': ('stop', 'skip'),
    'model.attention_impl': models.ATTENTION_IMPLS, 'model.remat_policy': models.REMAT_POLICIES,
    'model.posemb': models.POSEMB_TYPES, 'model.classifier': model_configs.CLASSIFIERS,
    'pp.train': PP_TRAIN, 'pp.eval': PP_EVAL, 'model.layout': models.LAYOUTS,
}
# Numeric fields -> the bounds their values must satisfy, ', '-separated (a field may be None
# where base_config defaults to None). warmup_steps >= total_steps is allowed, with a warning.
RANGES = {
    'batch': '>= 1', 'batch_eval': '>= 1', 'pp.resolution': '>= 1', 'pp.resize': '>= 1',
    'pp.area_min': '> 0, <= 1', 'shuffle_buffer': '>= 1', 'prefetch': '>= 0',
    'num_classes': '>= 1', 'total_steps': '>= 1', 'accum_steps': '>= 1', 'base_lr': '>= 0',
    'momentum': '>= 0, < 1', 'b1': '>= 0, < 1', 'b2': '>= 0, < 1', 'weight_decay': '>= 0',
    'grad_norm_clip': '>= 0', 'label_smoothing': '>= 0, < 1', 'peak_flops': '> 0',
    'log_every': '>= 1', 'eval_every': '>= 1', 'checkpoint_every': '>= 0',
    'keep_checkpoints': '>= 1', 'warmup_steps': '>= 0',
}
_COMPARISONS = {'>=': operator.ge, '>': operator.gt, '<=': operator.le, '<': operator.lt}


def _check_choices_and_ranges(config: ml_collections.ConfigDict) -> None:
  flat = _flatten(config.to_dict())
  for name, value in flat.items():  # Inf and NaN pass every comparison.
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'config.{name}={value!r} must be a finite number.')
  for name, table in CHOICES.items():  # A field the config lacks (BiT's model.posemb) is unset.
    if name in flat and flat[name] not in table:
      raise ValueError(f'config.{name}={flat[name]!r}; expected one of {tuple(table)}.')
  for name, bounds in RANGES.items():
    value = flat.get(name)
    for bound in bounds.split(', '):
      op, limit = bound.split()
      if value is not None and not _COMPARISONS[op](value, float(limit)):
        raise ValueError(f'config.{name}={value!r} must be {bound}.')
  if config.warmup_steps >= config.total_steps:  # As the official recipe, e.g. a short run.
    logging.warning('config.warmup_steps=%d >= config.total_steps=%d: the learning rate never '
                    'reaches config.base_lr=%s.', config.warmup_steps, config.total_steps,
                    config.base_lr)


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> None:
  """Raises ValueError naming the field for configs that cannot run, before any compilation."""
  _check_choices_and_ranges(config)
  accum = config.accum_steps
  if config.batch % accum:
    raise ValueError(f'config.batch={config.batch} is not divisible by '
                     f'config.accum_steps={accum}.')
  micro = config.batch // accum
  if micro % num_devices:
    raise ValueError(f'config.batch={config.batch} / config.accum_steps={accum} = {micro} '
                     f'is not divisible by the {num_devices} devices.')
  if config.batch_eval % num_devices or config.batch_eval % process_count:
    raise ValueError(f'config.batch_eval={config.batch_eval} is not divisible by the '
                     f'{num_devices} devices.')
  stride = model_configs.token_stride(config.model)
  if config.pp.resolution % stride:
    resnet = model_configs.resnet_stride(config.model.resnet)
    raise ValueError(
        f'config.pp.resolution={config.pp.resolution} is not a multiple of the patch size '
        f'{stride // resnet} (x {resnet} ResNet stride) of {config.model.model_name}.')


def with_defaults(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A run config read back from config.json, with base_config's value for each top-level field
  added to base_config after it was written."""
  return ml_collections.ConfigDict({**base_config().to_dict(), **saved})


def config_changes(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """`field: saved -> now` for each field outside RESUMABLE_FIELDS in which `config` differs from
  `saved` (a JSON dict, whose missing fields, added to base_config later, have their default)."""
  flat_json = lambda c: _flatten(json.loads(c.to_json_best_effort()))
  saved, current = {**flat_json(base_config()), **_flatten(saved)}, flat_json(config)
  missing = '(absent)'
  return [f'{key}: {saved.get(key, missing)!r} -> {current.get(key, missing)!r}'
          for key in sorted(saved.keys() | current.keys())
          if key not in RESUMABLE_FIELDS | REMOVED_FIELDS
          and saved.get(key, missing) != current.get(key, missing)]


# Fields that decide the train state's arrays (names and shapes) in a training checkpoint.
STATE_FIELDS = ('model.', 'model_name', 'num_classes', 'pp.resolution', 'optimizer')


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat

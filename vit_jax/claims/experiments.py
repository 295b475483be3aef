"""The miniature experiments: models, recipe, budgets (scales) and one training run's config.

Every run is an ordinary training run of `vit_jax.train` (the code path of `python -m
vit_jax.main`) in its own workdir. Budgets are matched in compute: a run's steps are its share
of the scale's budget (`RunSpec.budget`) times the train FLOPs of the reference ViT at 28px over
its own model's, so a ViT, a ResNet and a hybrid of one budget cost the same FLOPs.
"""
import dataclasses
import os
from typing import Optional

import ml_collections

from vit_jax import config_lib
from vit_jax import flops
from vit_jax import model_configs
from vit_jax import workdir as workdir_lib

REFERENCE_RESOLUTION = 28  # Fashion-MNIST's own size; other datasets are resized to it.
PATCH = 7
ARCHITECTURES = ('vit', 'resnet', 'hybrid')


@dataclasses.dataclass(frozen=True)
class Scale:
  """The budget of every run of one scale."""
  name: str
  steps: int  # Steps of the reference ViT for budget 1.
  batch: int
  seeds: tuple
  hidden: int
  layers: int
  data_sizes: tuple  # Claim 1: nested subsets of the train split (and the whole split).
  lr_scales: tuple  # Claim 3: multiples of the base learning rate.
  eval_examples: Optional[int]  # First examples of the eval split (None: all of it).
  evals_per_run: int
  analysis_images: int
  fewshot_pool: int
  speed_models: tuple  # Claim 9: (model name, resolution, batch) timed here.
  note: str = ''  # What the scale's verdicts are worth, for the report.


SCALES = {
    'quick': Scale('quick', steps=6, batch=16, seeds=(0,), hidden=32, layers=2,
                   data_sizes=(256, 1024), lr_scales=(1.0, 3.0), eval_examples=256,
                   evals_per_run=2, analysis_images=16, fewshot_pool=200,
                   speed_models=(('micro', 32, 4),),
                   note='A check of the machinery on a few steps: its verdicts say nothing '
                   'about the paper.'),
    'full': Scale('full', steps=500, batch=128, seeds=(0, 1), hidden=64, layers=4,
                  data_sizes=(1000, 3000, 10000), lr_scales=(0.3, 1.0, 3.0),
                  eval_examples=None, evals_per_run=4, analysis_images=128, fewshot_pool=2000,
                  speed_models=(('ViT-Ti_16', 224, 8), ('ViT-S_16', 224, 8),
                                ('ViT-B_16', 224, 8), ('BiT-R50x1', 224, 8))),
}
BASE_LR = 2e-3  # Adam, cosine decay, as the demo's fine-tuning recipe.


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run; fields left at their defaults are the reference ViT's."""
  arch: str = 'vit'  # One of ARCHITECTURES.
  seed: int = 0
  examples: Optional[int] = None  # The first `examples` of the train split (None: all).
  resolution: int = REFERENCE_RESOLUTION
  classifier: str = 'token'
  posemb: str = 'learn'
  lr_scale: float = 1.0
  budget: float = 1.0  # Share of the scale's compute budget.
  init_from: Optional['RunSpec'] = None  # Fine-tune this run's model.npz (head replaced).

  @property
  def name(self) -> str:
    """The workdir name: the architecture and every field that differs from the default."""
    default = RunSpec()
    parts = [self.arch]
    for field, tag in (('examples', 'n'), ('resolution', 'r'), ('classifier', ''),
                       ('posemb', 'pos-'), ('lr_scale', 'lr'), ('budget', 'c')):
      value = getattr(self, field)
      if value != getattr(default, field):
        parts.append(f'{tag}{value:g}' if isinstance(value, float) else f'{tag}{value}')
    if self.init_from is not None:
      parts.append(f'from-{self.init_from.name}')
    return '_'.join(parts + [f's{self.seed}'])


def model_config(spec: RunSpec, scale: Scale) -> ml_collections.ConfigDict:
  """The miniature model of `spec.arch`: a ViT with 7x7 patches; a BiT ResNet of two stages at
  half width (about the ViT's FLOPs at 28px); a hybrid of the ResNet root and the same ViT on
  its 7x7 feature map (1x1 patches)."""
  if spec.arch == 'resnet':
    return model_configs.bit('BiT-mini', (1, 1), width_factor=0.5)
  if spec.arch not in ARCHITECTURES:
    raise ValueError(f'Unknown architecture {spec.arch!r}; expected one of {ARCHITECTURES}.')
  config = model_configs.get_model_config('micro')
  config.update(model_name=f'ViT-mini_{PATCH}' if spec.arch == 'vit' else 'R+ViT-mini_1',
                hidden_size=scale.hidden, classifier=spec.classifier, posemb=spec.posemb)
  config.transformer.update(mlp_dim=4 * scale.hidden, num_heads=2, num_layers=scale.layers)
  config.patches.size = (1, 1) if spec.arch == 'hybrid' else (PATCH, PATCH)
  if spec.arch == 'hybrid':
    config.resnet = ml_collections.ConfigDict({'num_layers': (), 'width_factor': 0.5})
  return config


def describe_models(scale: Scale) -> str:
  """The miniature models in words, for the report."""
  return (f'ViT: {scale.layers} layers, hidden {scale.hidden}, MLP {4 * scale.hidden}, 2 heads, '
          f'{PATCH}x{PATCH} patches; BiT ResNet: root + 2 stages of one unit at half width; '
          'hybrid: the ResNet root + the same ViT on its feature map (1x1 patches)')


def train_flops(spec: RunSpec, scale: Scale, num_classes: int = 10) -> float:
  """Training FLOPs per image."""
  return flops.train_step_flops(model_config(spec, scale), spec.resolution, num_classes)


def steps(spec: RunSpec, scale: Scale) -> int:
  """The run's steps: its budget share in the reference ViT's FLOPs, rounded to a multiple of
  the evaluations per run so that every run is evaluated at the same fractions of its budget."""
  evals = scale.evals_per_run
  exact = scale.steps * spec.budget * train_flops(RunSpec(), scale) / train_flops(spec, scale)
  return evals * max(1, round(exact / evals))


def run_config(spec: RunSpec, scale: Scale, dataset: str, runs_dir: str,
               data_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """The full training config of one run (vit_jax.config_lib fields)."""
  config = config_lib.base_config()
  config_lib.set_dataset(config, dataset)
  config.data_dir = data_dir
  config.model = model_config(spec, scale)
  config.seed = spec.seed
  # The claims compare test accuracies: eval on the test split, no separate final test pass.
  # Nested subsets are the first N training examples (disjoint from the held-out minival).
  config.eval_split, config.test_split = config.test_split, ''
  if spec.examples is not None:
    config.train_split = f'{config.train_split.split("[")[0]}[:{spec.examples}]'
  if scale.eval_examples is not None:
    config.eval_split = f'{config.eval_split}[:{scale.eval_examples}]'
  config.pp.resolution = config.pp.resize = spec.resolution  # Random flips only, as the demo.
  config.batch, config.batch_eval = scale.batch, 500 if scale.eval_examples is None else 64
  config.shuffle_buffer = 10_000
  config.optimizer, config.weight_decay, config.decay_type = 'adam', 1e-4, 'cosine'
  config.base_lr = BASE_LR * spec.lr_scale
  config.total_steps = steps(spec, scale)
  config.warmup_steps = config.total_steps // 10
  config.eval_every = config.total_steps // scale.evals_per_run
  config.log_every = config.checkpoint_every = config.eval_every
  config.keep_checkpoints = 1
  config.progress = False  # The claims command shows one bar over the runs.
  if spec.init_from is not None:
    config.pretrained_path = workdir_lib.path(os.path.join(runs_dir, spec.init_from.name),
                                            workdir_lib.MODEL)
  return config

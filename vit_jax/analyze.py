r"""The paper's analyses as one command; each writes PNG and/or JSON files into --out_dir.

  python -m vit_jax.analyze --analysis=attention_maps --checkpoint=WORKDIR --out_dir=out/

--analysis names an entry of vit_jax.analysis.outputs.ANALYSES, or speed (examples: README).
Images for attention_maps / attention_distance: --images, else the first --num_images of the eval
split of the dataset config (--config, or the workdir's own). Few-shot uses the dataset config's
train split (the first --fewshot_pool examples) and eval split.
"""
import functools
import os
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from vit_jax import cli
from vit_jax import inference
from vit_jax import model_configs
from vit_jax.analysis import outputs


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defined by the program only, so that importing this module adds no flags elsewhere."""
  string = functools.partial(flags.DEFINE_string, flag_values=fv)
  integer = functools.partial(flags.DEFINE_integer, flag_values=fv)
  strings = functools.partial(flags.DEFINE_list, flag_values=fv)
  flags.DEFINE_enum('analysis', None, [*outputs.ANALYSES, 'speed'], 'Which analysis to run.',
                    flag_values=fv)
  string('out_dir', None, 'Directory for the PNG/JSON outputs (created).')
  string('checkpoint', None, 'A released-layout .npz or a training workdir. Needed by every '
         'analysis but speed.')
  string('model', None, 'Model name (vit_jax.model_configs) of a .npz checkpoint; for speed, the '
         'model to time when --speed_models is empty.')
  integer('resolution', None, 'Input resolution (default: the dataset config\'s, else the '
          'checkpoint\'s); position embeddings are resized to fit.')
  strings('images', [], 'Image files and/or directories (attention_maps, attention_distance).')
  config_flags.DEFINE_config_file('config', None, 'Dataset config (fields dataset, data_dir, '
                                  'train_split, eval_split, pp, batch_eval), e.g. '
                                  'configs/vit.py:b16,cifar10. Default: the workdir\'s.',
                                  flag_values=fv)
  integer('num_images', 128, 'Images taken from the eval split when --images is empty.',
          lower_bound=1)
  integer('batch_size', 32, 'Images per forward pass.')
  integer('num_components', 28, 'filters: principal components shown.')
  strings('shots', ['1', '5', '10', '25'], 'fewshot: examples per class.')
  integer('fewshot_seeds', 5, 'fewshot: random draws averaged per shot count.')
  flags.DEFINE_float('l2_reg', 1.0, 'fewshot: ridge regularisation of the least squares.',
                     flag_values=fv)
  integer('fewshot_pool', 10_000, 'fewshot: examples of the train split the shots are drawn '
          'from.')
  integer('num_eval', None, 'fewshot: eval examples used (default: the whole eval split).')
  strings('speed_models', [], 'speed: model names to time (default: the --checkpoint or --model '
          'model).')
  strings('resolutions', [], 'speed: resolutions (default: --resolution, else the checkpoint\'s, '
          'else 224).')
  strings('batch_sizes', ['1', '8', '64'], 'speed: batch sizes.')
  integer('speed_steps', 10, 'speed: timed forward passes per configuration.')
  flags.mark_flags_as_required(['analysis', 'out_dir'], flag_values=fv)


def _ints(values: Sequence[str], flag: str) -> list[int]:
  try:
    numbers = [int(v) for v in values]
  except ValueError:
    numbers = [0]
  if min(numbers, default=1) < 1:
    raise ValueError(f'--{flag} takes positive integers; got {",".join(values)}.')
  return numbers


def _load(fv: flags.FlagValues) -> inference.LoadedModel:
  if not fv.checkpoint:
    raise ValueError(f'--analysis={fv.analysis} needs --checkpoint.')
  resolution = fv.resolution or (fv.config.pp.resolution if fv.config is not None else None)
  return inference.load_model(fv.checkpoint, model_name=fv.model, resolution=resolution)


def _data_config(fv: flags.FlagValues, loaded: inference.LoadedModel):
  """The dataset config (--config, else the workdir's) at the model's resolution, or None."""
  config = fv.config if fv.config is not None else loaded.run_config
  if config is None:
    return None
  config = config.copy_and_resolve_references()
  config.pp.resolution = loaded.resolution
  return config


def _speed(fv: flags.FlagValues) -> dict:
  resolution = fv.resolution
  if fv.speed_models:
    configs = [model_configs.get_model_config(name) for name in fv.speed_models]
  elif fv.checkpoint:
    loaded = _load(fv)
    configs, resolution = [loaded.model_config], loaded.resolution
  elif fv.model:
    configs = [model_configs.get_model_config(fv.model)]
  else:
    raise ValueError('--analysis=speed needs --speed_models, --model or --checkpoint.')
  resolutions = _ints(fv.resolutions, 'resolutions') or [resolution or 224]
  return outputs.speed(configs, resolutions, _ints(fv.batch_sizes, 'batch_sizes'), fv.out_dir,
                       steps=fv.speed_steps)


def run(fv: flags.FlagValues) -> dict:
  """Runs --analysis; returns outputs' summary (the files written and headline numbers)."""
  if os.path.exists(fv.out_dir) and not os.path.isdir(fv.out_dir):
    raise cli.UserError(f'--out_dir={fv.out_dir} is a file, not a directory.')
  os.makedirs(fv.out_dir, exist_ok=True)
  if fv.analysis == 'speed':
    return _speed(fv)
  loaded = _load(fv)
  inputs = outputs.Inputs(
      fv.out_dir, _data_config(fv, loaded), images=fv.images, num_images=fv.num_images,
      batch_size=fv.batch_size, num_components=fv.num_components,
      shots=_ints(fv.shots, 'shots'), fewshot_seeds=fv.fewshot_seeds, l2_reg=fv.l2_reg,
      fewshot_pool=fv.fewshot_pool, num_eval=fv.num_eval)
  return outputs.run(fv.analysis, loaded, inputs)


def main(argv: Sequence[str]) -> None:
  """Runs --analysis and prints the paths of the files it wrote, one per line."""
  cli.check_no_arguments(argv)
  summary = run(flags.FLAGS)
  files = []
  for kind in ('png', 'json'):
    written = summary.get(kind, [])
    files += [written] if isinstance(written, str) else written
  print('\n'.join(files))


if __name__ == '__main__':
  define_flags()
  cli.run(main)

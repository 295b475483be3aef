"""The analyses of a loaded model, by name (`ANALYSES`): each writes its figures (PNG) and
numbers (JSON) into a directory and returns a summary dict (the files it wrote under 'png' /
'json' plus headline numbers), and has a Markdown section for a report. `vit_jax.analyze` runs
one, `vit_jax.report` each of those it is asked for; a new analysis is a new entry.
"""
import dataclasses
import functools
import json
import os
from typing import Callable, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from vit_jax import benchmark_lib
from vit_jax import checkpoint
from vit_jax import inference
from vit_jax import input_pipeline
from vit_jax import model_configs
from vit_jax import models
from vit_jax import output_check
from vit_jax.analysis import attention
from vit_jax.analysis import data
from vit_jax.analysis import embeddings
from vit_jax.analysis import fewshot as fewshot_lib
from vit_jax.analysis import plots


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What the analyses read besides the model: where to write, the dataset config (eval images,
  few-shot splits; None without one) and the options of analyze's and report's flags."""
  out_dir: str
  config: Optional[ml_collections.ConfigDict] = None
  images: Sequence[str] = ()  # Image files / directories; default: the config's eval split.
  num_images: int = 128
  batch_size: int = 32
  num_components: int = 28
  shots: Sequence[int] = (1, 5, 10, 25)
  fewshot_seeds: int = 5
  l2_reg: float = 1.0
  fewshot_pool: int = 10_000
  num_eval: Optional[int] = None

  def analysis_images(self, resolution: int) -> tuple[list[str], np.ndarray]:
    return data.analysis_images(resolution, self.images, self.config, self.num_images)


def write_json(obj, path: str) -> str:
  checkpoint.write_atomically(path, json.dumps(obj, indent=1))
  return path


def _of_attention(loaded: inference.LoadedModel, inputs: Inputs, images: np.ndarray,
                  fn: Callable, what: str) -> np.ndarray:
  """`fn(attention weights)` of every image, jitted over batches, checked finite."""
  apply = jax.jit(lambda params, batch: fn(attention.attention_weights(loaded.model, params,
                                                                       batch)))
  values = inference.map_batches(functools.partial(apply, loaded.params), images,
                                 inputs.batch_size, desc=what)
  output_check.check_finite(values, f'Checkpoint {loaded.source}', what=what,
                            model=loaded.model, params=loaded.params, images=images)
  return values


def attention_maps(loaded: inference.LoadedModel, inputs: Inputs) -> dict:
  """Fig. 6: the rollout map of each image overlaid on it, one PNG per image."""
  names, images = inputs.analysis_images(loaded.resolution)
  maps = _of_attention(loaded, inputs, images, lambda weights: attention.rollout_map(
      weights, loaded.grid, loaded.has_class_token), 'attention maps')
  pngs = []
  for i, (name, image, heat) in enumerate(zip(names, images, maps)):
    stem = os.path.splitext(os.path.basename(name))[0]
    pngs.append(plots.attention_overlay(image, heat, os.path.join(
        inputs.out_dir, f'attention_map_{i:03d}_{stem}.png'), title=name))
  path = write_json({'grid': list(loaded.grid),
                     'maps': {name: heat.tolist() for name, heat in zip(names, maps)}},
                    os.path.join(inputs.out_dir, 'attention_maps.json'))
  return {'png': pngs, 'json': path, 'names': names}


def posemb_similarity(loaded: inference.LoadedModel, inputs: Inputs) -> dict:
  """Fig. 7 centre: cosine similarity between the patches' position embeddings."""
  posemb = embeddings.patch_position_embeddings(loaded.params, loaded.has_class_token)
  similarity = embeddings.cosine_similarity(posemb)
  grid = loaded.grid
  if similarity.shape[0] != grid[0] * grid[1]:
    raise ValueError(f'{loaded.source}: {similarity.shape[0]} position embeddings do not form the '
                     f'{grid[0]}x{grid[1]} patch grid of {loaded.resolution}px.')
  return {
      'png': plots.position_similarity(similarity, grid,
                                       os.path.join(inputs.out_dir, 'posemb_similarity.png')),
      'json': write_json({'grid': list(grid), 'similarity': similarity.tolist()},
                         os.path.join(inputs.out_dir, 'posemb_similarity.json')),
      'similarity': similarity,
  }


def filters(loaded: inference.LoadedModel, inputs: Inputs) -> dict:
  """Fig. 7 left: the top principal components of the patch-embedding filters (a ViT's: see
  `_hybrid`)."""
  components, explained = embeddings.principal_components(
      loaded.params['embedding']['kernel'], inputs.num_components)
  return {
      'png': plots.embedding_filters(components, os.path.join(inputs.out_dir, 'filters.png')),
      'json': write_json({'explained_variance_ratio': explained.tolist(),
                          'components': components.tolist()},
                         os.path.join(inputs.out_dir, 'filters.json')),
      'explained_variance': float(explained.sum()),
  }


def attention_distance(loaded: inference.LoadedModel, inputs: Inputs) -> dict:
  """Fig. 7 right: mean attention distance per layer and head, averaged over the images."""
  _, images = inputs.analysis_images(loaded.resolution)
  out_dir = inputs.out_dir
  patch_px = model_configs.token_stride(loaded.model_config)
  mean = _of_attention(loaded, inputs, images, lambda weights: attention.mean_attention_distance(
      weights, loaded.grid, patch_px, loaded.has_class_token), 'attention distances').mean(axis=0)
  return {
      'png': plots.attention_distance(mean, os.path.join(out_dir, 'attention_distance.png'),
                                      image_size=loaded.resolution),
      'json': write_json({'num_images': len(images), 'patch_size_px': patch_px,
                          'resolution': loaded.resolution,
                          'mean_distance_px': mean.tolist()},  # [layer][head]
                         os.path.join(out_dir, 'attention_distance.json')),
      'mean_distance_px': mean, 'num_images': len(images),
  }


def fewshot(loaded: inference.LoadedModel, inputs: Inputs) -> dict:
  """Few-shot linear accuracy on the config's eval split from frozen pre-logit features, fitted
  on shots drawn from the first `inputs.fewshot_pool` examples of its train split."""
  config = inputs.config
  if config is None:
    raise ValueError('fewshot needs a dataset config: --config, or a workdir as --checkpoint.')
  if config.pp.resolution != loaded.resolution:
    raise ValueError(f'The dataset config feeds {config.pp.resolution}px images but the model was '
                     f'loaded for {loaded.resolution}px.')
  representation = models.build_model(loaded.model_config, num_classes=0)
  backbone = {k: v for k, v in loaded.params.items() if k != 'head'}
  embed = jax.jit(lambda params, x: representation.apply({'params': params}, x, train=False))

  def features(split, limit):
    feats, labels = [], []
    for batch in tqdm.tqdm(data.batches(config, split, limit), desc=f'features {split}'):
      feats.append(np.asarray(embed(backbone, batch['image']))[batch['mask']])
      output_check.check_finite(feats[-1], f'Checkpoint {loaded.source}',
                                what=f'pre-logit features on {split}', model=representation,
                                params=backbone, images=batch['image'][batch['mask']])
      labels.append(batch['label'][batch['mask']])
    return np.concatenate(feats), np.concatenate(labels)

  train_x, train_y = features(config.train_split, inputs.fewshot_pool)
  eval_x, eval_y = features(config.eval_split, inputs.num_eval)
  num_classes = input_pipeline.get_dataset_info(config).num_classes
  results = fewshot_lib.evaluate(train_x, train_y, eval_x, eval_y, num_classes=num_classes,
                                 shots=inputs.shots, seeds=inputs.fewshot_seeds,
                                 l2_reg=inputs.l2_reg)
  for n, r in results.items():
    logging.info('%d-shot linear accuracy: %.2f%% +- %.2f', n, 100 * r['mean'], 100 * r['std'])
  path = write_json({'dataset': config.dataset, 'train_split': config.train_split,
                     'eval_split': config.eval_split, 'pool_size': len(train_y),
                     'num_eval': len(eval_y), 'feature_dim': int(train_x.shape[1]),
                     'l2_reg': inputs.l2_reg, 'seeds': inputs.fewshot_seeds,
                     'results': {str(n): r for n, r in results.items()}},
                    os.path.join(inputs.out_dir, 'fewshot.json'))
  return {'json': path, 'results': results}


def speed(model_configs: Sequence[ml_collections.ConfigDict], resolutions: Sequence[int],
          batch_sizes: Sequence[int], out_dir: str, *, steps: int = 10,
          num_classes: int = 1000) -> dict:
  """Images/s and peak memory for every (model, resolution, batch size), smallest first."""
  grid = [(c, r, b) for c in model_configs for r in sorted(resolutions)
          for b in sorted(batch_sizes)]
  records = []
  for config, resolution, batch_size in tqdm.tqdm(grid, desc='speed'):
    record = benchmark_lib.forward_speed(config, resolution=resolution,
                                         batch_size=batch_size, num_classes=num_classes,
                                         steps=steps)
    logging.info('%s @ %dpx, batch %d: %.1f images/s, peak memory %.1f MiB (%s)',
                 record['model'], resolution, batch_size, record['images_per_s'],
                 record['peak_memory_bytes'] / 2**20, record['memory_source'])
    records.append(record)
  return {'json': write_json(records, os.path.join(out_dir, 'speed.json')), 'records': records}


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Analysis:
  """`run(loaded, inputs)` -> summary; `markdown(summary, image)` -> the lines of its report
  section under `title` (`image(path, alt)` links a figure); `not_applicable(loaded)` -> why it
  does not apply to a model, or None."""
  title: str
  run: Callable
  markdown: Callable
  not_applicable: Callable = lambda loaded: None


def _hybrid(loaded) -> Optional[str]:
  if loaded.model_config.get('resnet') is None:  # The patch embedding sees pixels.
    return None
  return (f'{loaded.name} is a hybrid: its patch embedding sees ResNet features, not pixels, so '
          'its filters cannot be shown as image patches.')


ANALYSES = {
    'attention_maps': Analysis(
        'Attention maps (Fig. 6)', attention_maps,
        lambda r, image: [image(path, f'attention map of {name}')
                          for path, name in zip(r['png'], r['names'])]),
    'posemb_similarity': Analysis(
        'Position-embedding similarity (Fig. 7 centre)', posemb_similarity,
        lambda r, image: [image(r['png'], 'position embedding similarity')]),
    'filters': Analysis(
        'Embedding filters (Fig. 7 left)', filters,
        lambda r, image: [f'The components shown explain {r["explained_variance"]:.1%} of the '
                          'filters\' variance.', '', image(r['png'], 'embedding filters')],
        _hybrid),
    'attention_distance': Analysis(
        'Mean attention distance (Fig. 7 right)', attention_distance,
        lambda r, image: [f'Averaged over {r["num_images"]} images.', '',
                          image(r['png'], 'mean attention distance')]),
    'fewshot': Analysis(
        'Few-shot linear accuracy', fewshot,
        lambda r, image: ['| Shots per class | Accuracy (mean ± std) |', '|---|---|'] + [
            f'| {n} | {x["mean"]:.2%} ± {x["std"]:.2%} |' for n, x in r['results'].items()]),
}


def run(name: str, loaded, inputs: Inputs) -> dict:
  """Runs analysis `name` (ValueError when it does not apply to the model)."""
  reason = ANALYSES[name].not_applicable(loaded)
  if reason:
    raise ValueError(reason)
  return ANALYSES[name].run(loaded, inputs)


def markdown_section(name: str, loaded, inputs: Inputs, image: Callable) -> list[str]:
  """The report section of analysis `name` on `loaded` (run here), or why it does not apply."""
  analysis = ANALYSES[name]
  reason = analysis.not_applicable(loaded)
  body = ([f'Not applicable: {reason}'] if reason
          else analysis.markdown(analysis.run(loaded, inputs), image))
  return [f'### {analysis.title}', ''] + body

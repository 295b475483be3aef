"""Runs one analysis on a loaded model and writes its figures (PNG) and numbers (JSON) into a
directory. Shared by `vit_jax.analyze` (one analysis per call) and `vit_jax.report` (all of them).

Each function returns a summary dict: the files it wrote under 'png' / 'json' plus headline
numbers for a report.
"""
import functools
import json
import os
from typing import Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from vit_jax import inference
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import output_check
from vit_jax.analysis import attention
from vit_jax.analysis import data
from vit_jax.analysis import embeddings
from vit_jax.analysis import fewshot as fewshot_lib
from vit_jax.analysis import plots
from vit_jax.analysis import speed as speed_lib

ANALYSES = ('attention_maps', 'posemb_similarity', 'filters', 'attention_distance', 'fewshot',
            'speed')


def write_json(obj, path: str) -> str:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=1)
  return path


def attention_maps(loaded: inference.LoadedModel, images: np.ndarray, names: Sequence[str],
                   out_dir: str, *, batch_size: int = 32) -> dict:
  """Fig. 6: the rollout map of each image overlaid on it, one PNG per image."""
  model = loaded.model

  @jax.jit
  def rollout_maps(params, batch):
    weights = attention.attention_weights(model, params, batch)
    return attention.rollout_map(weights, loaded.grid, loaded.has_class_token)

  maps = inference.map_batches(functools.partial(rollout_maps, loaded.params), images,
                               batch_size, desc='attention rollout')
  _check_finite(maps, loaded, images, 'attention maps')
  pngs = []
  for i, (name, image, heat) in enumerate(zip(names, images, maps)):
    stem = os.path.splitext(os.path.basename(name))[0]
    pngs.append(plots.attention_overlay(
        image, heat, os.path.join(out_dir, f'attention_map_{i:03d}_{stem}.png'), title=name))
  path = write_json({'grid': list(loaded.grid),
                     'maps': {name: heat.tolist() for name, heat in zip(names, maps)}},
                    os.path.join(out_dir, 'attention_maps.json'))
  return {'png': pngs, 'json': path}


def _check_finite(values: np.ndarray, loaded: inference.LoadedModel, images: np.ndarray,
                  what: str) -> None:
  output_check.check_finite(values, f'Checkpoint {loaded.source}', what=what,
                            model=loaded.model, params=loaded.params, images=images)


def posemb_similarity(loaded: inference.LoadedModel, out_dir: str) -> dict:
  """Fig. 7 centre: cosine similarity between the patches' position embeddings."""
  posemb = embeddings.patch_position_embeddings(loaded.params, loaded.has_class_token)
  similarity = embeddings.cosine_similarity(posemb)
  grid = loaded.grid
  if similarity.shape[0] != grid[0] * grid[1]:
    raise ValueError(f'{loaded.source}: {similarity.shape[0]} position embeddings do not form the '
                     f'{grid[0]}x{grid[1]} patch grid of {loaded.resolution}px.')
  return {
      'png': plots.position_similarity(similarity, grid,
                                       os.path.join(out_dir, 'posemb_similarity.png')),
      'json': write_json({'grid': list(grid), 'similarity': similarity.tolist()},
                         os.path.join(out_dir, 'posemb_similarity.json')),
  }


def filters(loaded: inference.LoadedModel, out_dir: str, *, num_components: int = 28) -> dict:
  """Fig. 7 left: the top principal components of the patch-embedding filters."""
  if not embeddings.has_pixel_patch_embedding(loaded.model_config):
    raise ValueError(f'{loaded.name} is a hybrid: its patch embedding sees ResNet features, not '
                     'pixels, so its filters cannot be shown as image patches.')
  components, explained = embeddings.principal_components(
      loaded.params['embedding']['kernel'], num_components)
  return {
      'png': plots.embedding_filters(components, os.path.join(out_dir, 'filters.png')),
      'json': write_json({'explained_variance_ratio': explained.tolist(),
                          'components': components.tolist()},
                         os.path.join(out_dir, 'filters.json')),
      'explained_variance': float(explained.sum()),
  }


def attention_distance(loaded: inference.LoadedModel, images: np.ndarray, out_dir: str, *,
                       batch_size: int = 32) -> dict:
  """Fig. 7 right: mean attention distance per layer and head, averaged over `images`."""
  model = loaded.model
  patch_px = inference.token_stride(loaded.model_config)

  @jax.jit
  def distances(params, batch):
    weights = attention.attention_weights(model, params, batch)
    return attention.mean_attention_distance(weights, loaded.grid, patch_px,
                                             loaded.has_class_token)

  per_image = inference.map_batches(functools.partial(distances, loaded.params), images,
                                    batch_size, desc='attention distance')
  _check_finite(per_image, loaded, images, 'attention distances')
  mean = per_image.mean(axis=0)
  return {
      'png': plots.attention_distance(mean, os.path.join(out_dir, 'attention_distance.png'),
                                      image_size=loaded.resolution),
      'json': write_json({'num_images': len(images), 'patch_size_px': patch_px,
                          'resolution': loaded.resolution,
                          'mean_distance_px': mean.tolist()},  # [layer][head]
                         os.path.join(out_dir, 'attention_distance.json')),
      'mean_distance_px': mean,
  }


def fewshot(loaded: inference.LoadedModel, config: ml_collections.ConfigDict, out_dir: str, *,
            shots: Sequence[int] = (1, 5, 10, 25), seeds: int = 5, l2_reg: float = 1.0,
            pool_size: int = 10_000, num_eval: Optional[int] = None) -> dict:
  """Few-shot linear accuracy on `config.eval_split` from frozen pre-logit features, fitted on
  shots drawn from the first `pool_size` examples of `config.train_split`."""
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

  train_x, train_y = features(config.train_split, pool_size)
  eval_x, eval_y = features(config.eval_split, num_eval)
  num_classes = input_pipeline.get_dataset_info(config).num_classes
  results = fewshot_lib.evaluate(train_x, train_y, eval_x, eval_y, num_classes=num_classes,
                                 shots=shots, seeds=seeds, l2_reg=l2_reg)
  for n, r in results.items():
    logging.info('%d-shot linear accuracy: %.2f%% +- %.2f', n, 100 * r['mean'], 100 * r['std'])
  path = write_json({'dataset': config.dataset, 'train_split': config.train_split,
                     'eval_split': config.eval_split, 'pool_size': len(train_y),
                     'num_eval': len(eval_y), 'feature_dim': int(train_x.shape[1]),
                     'l2_reg': l2_reg, 'seeds': seeds,
                     'results': {str(n): r for n, r in results.items()}},
                    os.path.join(out_dir, 'fewshot.json'))
  return {'json': path, 'results': results}


def speed(model_configs: Sequence[ml_collections.ConfigDict], resolutions: Sequence[int],
          batch_sizes: Sequence[int], out_dir: str, *, steps: int = 10,
          num_classes: int = 1000) -> dict:
  """Images/s and peak memory for every (model, resolution, batch size), smallest first."""
  grid = [(c, r, b) for c in model_configs for r in sorted(resolutions)
          for b in sorted(batch_sizes)]
  records = []
  for config, resolution, batch_size in tqdm.tqdm(grid, desc='speed'):
    record = speed_lib.measure(config, resolution=resolution, batch_size=batch_size,
                               num_classes=num_classes, steps=steps)
    logging.info('%s @ %dpx, batch %d: %.1f images/s, peak memory %.1f MiB (%s)',
                 record['model'], resolution, batch_size, record['images_per_s'],
                 record['peak_memory_bytes'] / 2**20, record['memory_source'])
    records.append(record)
  return {'json': write_json(records, os.path.join(out_dir, 'speed.json')), 'records': records}

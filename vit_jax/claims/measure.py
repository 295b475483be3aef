"""Measurements on the claims' finished runs: accuracies over seeds, and the paper's analyses
(vit_jax.analysis) on the trained models."""
import os
from typing import Callable, Sequence

import numpy as np

from vit_jax import benchmark_lib
from vit_jax import inference
from vit_jax import model_configs
from vit_jax.analysis import attention
from vit_jax.analysis import outputs
from vit_jax.claims import experiments
from vit_jax.claims import runner

# A head "attends globally" when its mean distance reaches this fraction of uniform attention's
# (attention spread evenly over the image). At the paper's 14x14 grid uniform attention's
# distance is about half the image size, the threshold; on the miniature's small grid
# half the image is beyond what even uniform attention reaches.
GLOBAL_FRACTION = 0.9


class MissingRun(Exception):
  """A run a claim needs failed or was not trained."""


def ok(results: dict, spec: experiments.RunSpec) -> runner.RunResult:
  result = results.get(spec)
  if result is None or result.failure:
    reason = 'not run' if result is None else result.failure
    raise MissingRun(f'run {spec.name}: {reason}')
  return result


def top1s(results: dict, make: Callable[[int], experiments.RunSpec],
          seeds: Sequence[int]) -> list:
  """Final eval top-1 in percent of `make(seed)` for every seed."""
  return [100.0 * ok(results, make(seed)).top1 for seed in seeds]


def mean_std(values: Sequence[float]) -> str:
  return f'{np.mean(values):.2f} +- {np.std(values):.2f}'


def _analyse(result: runner.RunResult, out_dir: str, analysis: Callable, **options) -> tuple:
  """(the run's model, `analysis` of it writing into OUT_DIR/analysis/<run>)."""
  loaded = inference.load_model(result.workdir)
  path = os.path.join(out_dir, 'analysis', os.path.basename(result.workdir))
  os.makedirs(path, exist_ok=True)
  return loaded, analysis(loaded, outputs.Inputs(path, loaded.run_config, **options))


def uniform_attention_distance(grid: Sequence[int], patch_px: float) -> float:
  """Mean distance of attention spread evenly over all patches."""
  return float(attention.patch_distances(grid, patch_px).mean())


def attention_distance(result: runner.RunResult, scale: experiments.Scale,
                       out_dir: str) -> dict:
  """Mean attention distance per layer and head (Fig. 7 right) on the eval images, its slope
  against depth and the fraction of global heads per layer."""
  loaded, summary = _analyse(result, out_dir, outputs.attention_distance,
                             num_images=scale.analysis_images)
  distances = np.asarray(summary['mean_distance_px'])  # [layers, heads]
  per_layer = distances.mean(axis=1)
  uniform = uniform_attention_distance(loaded.grid, model_configs.token_stride(loaded.model_config))
  slope = float(np.polyfit(np.arange(1, len(per_layer) + 1), per_layer, 1)[0])
  return {'mean_distance_px': distances.tolist(), 'slope_px_per_layer': slope,
          'uniform_distance_px': uniform,
          'global_fraction': (distances >= GLOBAL_FRACTION * uniform).mean(axis=1).tolist(),
          'png': summary['png']}


def grid_structure(similarity: np.ndarray, grid: Sequence[int]) -> dict:
  """How a [patches, patches] similarity follows the patch grid, over pairs of distinct patches:
  its correlation with the negative grid distance, and the row/column effect, the coefficient
  of "same row or column" in a least-squares fit similarity ~ 1 + distance + same_line."""
  rows, cols = np.divmod(np.arange(len(similarity)), grid[1])
  pairs = np.triu_indices(len(similarity), k=1)
  distance = attention.patch_distances(grid, 1.0)[pairs]
  same_line = ((rows[:, None] == rows[None]) | (cols[:, None] == cols[None]))[pairs]
  values = similarity[pairs]
  design = np.stack([np.ones_like(distance), distance, same_line.astype(np.float64)], axis=1)
  coefficients = np.linalg.lstsq(design, values, rcond=None)[0]
  return {'distance_correlation': float(np.corrcoef(values, -distance)[0, 1]),
          'same_line_effect': float(coefficients[2])}


def posemb_structure(result: runner.RunResult, out_dir: str) -> dict:
  """Fig. 7 centre on a trained model: `grid_structure` of its position embeddings' cosine
  similarity, and the figure."""
  loaded, summary = _analyse(result, out_dir, outputs.posemb_similarity)
  return {**grid_structure(summary['similarity'], loaded.grid), 'png': summary['png']}


def fewshot_accuracy(result: runner.RunResult, scale: experiments.Scale, out_dir: str,
                     shots: int = 5) -> float:
  """`shots`-shot linear accuracy (percent) of the frozen features, 3 draws."""
  _, summary = _analyse(result, out_dir, outputs.fewshot, shots=(shots,), fewshot_seeds=3,
                        fewshot_pool=scale.fewshot_pool, num_eval=scale.eval_examples or 2000)
  return 100.0 * summary['results'][shots]['mean']


def speed(scale: experiments.Scale) -> list:
  """Inference images/s of the scale's speed models on this machine (Fig. 12 in small)."""
  return [benchmark_lib.forward_speed(model_configs.get_model_config(name),
                                      resolution=resolution, batch_size=batch, steps=3)
          for name, resolution, batch in scale.speed_models]

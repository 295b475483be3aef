"""Matplotlib figures (Agg backend), saved as PNG: the analyses', training curves and the claims
report's curves (mean over seeds with a +- one standard deviation band) and scatter plots."""
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from PIL import Image

_DPI = 120


def _save(fig, path: str, ax=None, xlabel: str = '', ylabel: str = '', title: str = '') -> str:
  """Writes the figure (labelling `ax` first if given) and closes it."""
  if ax is not None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
  fig.savefig(path, dpi=_DPI, bbox_inches='tight')
  plt.close(fig)
  return path


def mosaic(tiles: np.ndarray, columns: int, fill: float = np.nan, pad: int = 1) -> np.ndarray:
  """Tiles [n, h, w(, c)] laid out row-major, `columns` per row, `pad` pixels of `fill` between."""
  n, h, w = tiles.shape[:3]
  rows = -(-n // columns)
  out = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad) + tiles.shape[3:], fill)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, columns)
    out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tile
  return out


def upsample(attention_map: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of a [grid_h, grid_w] map to `size` (h, w)."""
  image = Image.fromarray(np.asarray(attention_map, np.float32), mode='F')
  return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR))


def attention_overlay(image: np.ndarray, attention_map: np.ndarray, path: str,
                      title: str = '') -> str:
  """Input image, its rollout map (max-normalised, upsampled) and the image weighted by the map
  (as in Fig. 6), side by side."""
  heat = upsample(attention_map, image.shape[:2])
  heat = heat / max(heat.max(), 1e-12)
  fig, axes = plt.subplots(1, 3, figsize=(8, 3.0))
  shown = np.clip((image + 1.0) / 2.0, 0.0, 1.0)  # [-1, 1] model input -> [0, 1] for imshow.
  for ax, picture, label, style in (
      (axes[0], shown, 'input', {'interpolation': 'nearest'}),
      (axes[1], heat, 'attention rollout', {'cmap': 'inferno', 'vmin': 0.0, 'vmax': 1.0}),
      (axes[2], shown * heat[..., None], 'input x attention', {'interpolation': 'nearest'})):
    ax.imshow(picture, **style)
    ax.set_title(label)
    ax.axis('off')
  fig.suptitle(title, fontsize=8)
  return _save(fig, path)


def position_similarity(similarity: np.ndarray, grid: Sequence[int], path: str) -> str:
  """Fig. 7 centre: for each patch (tile at its grid position) its similarity to every patch."""
  tiles = similarity.reshape((-1,) + tuple(grid))
  fig, ax = plt.subplots(figsize=(6, 5.5))
  cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
  shown = ax.imshow(mosaic(tiles, grid[1]), cmap=cmap, vmin=-1.0, vmax=1.0,
                    interpolation='nearest')
  ax.set(xticks=[], yticks=[], xlabel='Input patch column', ylabel='Input patch row',
         title='Position embedding similarity')
  fig.colorbar(shown, ax=ax, label='Cosine similarity', fraction=0.046)
  return _save(fig, path)


def embedding_filters(components: np.ndarray, path: str, columns: int = 7) -> str:
  """Fig. 7 left: each principal component [k, P, P, C] min-max normalised to one RGB (or gray)
  patch of its own."""
  flat = components.reshape(len(components), -1)
  low, high = flat.min(axis=1), flat.max(axis=1)
  scale = np.where(high > low, high - low, 1.0)
  tiles = (components - low[:, None, None, None]) / scale[:, None, None, None]
  if tiles.shape[-1] == 1:
    tiles = np.repeat(tiles, 3, axis=-1)
  columns = min(columns, len(tiles))
  fig, ax = plt.subplots(figsize=(1.0 * columns, 1.0 * -(-len(tiles) // columns) + 0.5))
  ax.imshow(mosaic(tiles, columns, fill=1.0), interpolation='nearest')
  ax.axis('off')
  ax.set_title(f'RGB embedding filters (first {len(tiles)} principal components)')
  return _save(fig, path)


def attention_distance(distances: np.ndarray, path: str, image_size: Optional[int] = None) -> str:
  """Fig. 7 right: mean attention distance [layers, heads] of every head against depth."""
  layers, heads = distances.shape
  fig, ax = plt.subplots(figsize=(5, 4))
  depth = np.arange(1, layers + 1)
  for h in range(heads):
    ax.scatter(depth, distances[:, h], s=14, label=f'head {h + 1}')
  ax.set(xlabel='Network depth (layer)', ylabel='Mean attention distance (pixels)',
         xticks=depth, ylim=(0, image_size or None), title='Mean attention distance')
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2, loc='lower right')
  return _save(fig, path)


def training_curves(events: Sequence[Mapping[str, float]], path: str, title: str = '') -> str:
  """Training loss and eval top-1 against step, from metrics.jsonl events."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for ax, key, label in ((axes[0], 'loss', 'training loss'), (axes[1], 'eval_top1', 'eval top-1')):
    points = [(e['step'], e[key]) for e in events if key in e]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, marker='o' if len(points) < 30 else None, markersize=3)
    else:
      ax.text(0.5, 0.5, f'no {key} recorded', ha='center', va='center', transform=ax.transAxes)
    ax.set(xlabel='step', ylabel=label)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  return _save(fig, path)


def curves(series: Mapping[str, tuple], path: str, *, xlabel: str, ylabel: str, title: str,
           logx: bool = True) -> str:
  """One line per series {label: (x [n], values [seeds, n])}: the mean over seeds, with a band
  of +- one standard deviation."""
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for label, (x, values) in series.items():
    values = np.asarray(values, np.float64).reshape(-1, len(x))
    mean, std = values.mean(axis=0), values.std(axis=0)
    ax.plot(x, mean, marker='o', markersize=4, label=label)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  if logx:
    ax.set_xscale('log')
  ax.legend(fontsize=8)
  return _save(fig, path, ax, xlabel, ylabel, title)


def scatter(x: Sequence[float], y: Sequence[float], labels: Sequence[str], path: str, *,
            xlabel: str, ylabel: str, title: str) -> str:
  """Labelled points."""
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.scatter(x, y)
  for xi, yi, label in zip(x, y, labels):
    ax.annotate(label, (xi, yi), fontsize=7, xytext=(3, 3), textcoords='offset points')
  return _save(fig, path, ax, xlabel, ylabel, title)

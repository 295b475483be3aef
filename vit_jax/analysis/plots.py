"""Matplotlib figures (Agg backend) of the analyses and of training curves, saved as PNG."""
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from PIL import Image

_DPI = 120


def _save(fig, path: str) -> str:
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


def _to_display(image: np.ndarray) -> np.ndarray:
  """[-1, 1] model input -> [0, 1] for imshow."""
  return np.clip((image + 1.0) / 2.0, 0.0, 1.0)


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
  axes[0].imshow(_to_display(image), interpolation='nearest')
  axes[0].set_title('input')
  axes[1].imshow(heat, cmap='inferno', vmin=0.0, vmax=1.0)
  axes[1].set_title('attention rollout')
  axes[2].imshow(_to_display(image) * heat[..., None], interpolation='nearest')
  axes[2].set_title('input x attention')
  for ax in axes:
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
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_xlabel('Input patch column')
  ax.set_ylabel('Input patch row')
  ax.set_title('Position embedding similarity')
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
  ax.set_xlabel('Network depth (layer)')
  ax.set_ylabel('Mean attention distance (pixels)')
  ax.set_xticks(depth)
  ax.set_ylim(0, image_size or None)
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2, loc='lower right')
  ax.set_title('Mean attention distance')
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
    ax.set_xlabel('step')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  return _save(fig, path)

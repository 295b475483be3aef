"""Attention analyses: rollout maps (Fig. 6) and mean attention distance (Fig. 7 right).

Attention tensors are [batch, layers, heads, queries, keys] with the class token (if any) first.
"""
from typing import Sequence

import jax.numpy as jnp
import numpy as np

_BLOCK_PREFIX = 'encoderblock_'


def attention_weights(model, params, images) -> jnp.ndarray:
  """Attention probabilities of every encoder block, [batch, layers, heads, tokens, tokens]."""
  _, state = model.apply({'params': params}, images, train=False, mutable=['intermediates'])
  blocks = state['intermediates']['Transformer']
  names = sorted((n for n in blocks if n.startswith(_BLOCK_PREFIX)),
                 key=lambda n: int(n[len(_BLOCK_PREFIX):]))
  return jnp.stack(
      [blocks[n]['MultiHeadDotProductAttention_1']['attention_weights'][0] for n in names], axis=1)


def rollout(weights: jnp.ndarray) -> jnp.ndarray:
  """Attention rollout (Abnar & Zuidema 2020), [batch, tokens, tokens]: per layer, average the
  heads, add the identity for the residual connection and renormalise the rows; then multiply the
  layers, the last on the left. Row q says how much each input token flows into output token q."""
  tokens = weights.shape[-1]
  per_layer = weights.mean(axis=2) + jnp.eye(tokens, dtype=weights.dtype)
  per_layer = per_layer / per_layer.sum(axis=-1, keepdims=True)
  result = per_layer[:, 0]
  for layer in range(1, per_layer.shape[1]):
    result = per_layer[:, layer] @ result
  return result


def rollout_map(weights: jnp.ndarray, grid: Sequence[int], has_class_token: bool) -> jnp.ndarray:
  """[batch, grid_h, grid_w]: how much each patch flows into the classifier's input — the class
  token's rollout row, or for global-average-pooling models the mean row over all patches."""
  result = rollout(weights)
  patches = result[:, 0, 1:] if has_class_token else result.mean(axis=1)
  return patches.reshape((-1,) + tuple(grid))


def patch_distances(grid: Sequence[int], patch_px: float) -> np.ndarray:
  """[patches, patches] Euclidean pixel distance between patch centres (row-major patches)."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  centres = np.stack([rows.ravel(), cols.ravel()], axis=-1) * float(patch_px)
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(weights: jnp.ndarray, grid: Sequence[int], patch_px: float,
                            has_class_token: bool) -> jnp.ndarray:
  """[batch, layers, heads]: attention-weighted mean pixel distance from each query patch to the
  key patches, averaged over the query patches. The class token is left out as query and key, and
  each query's attention over the patches is renormalised so the weights of the average sum to 1.
  """
  if has_class_token:
    weights = weights[..., 1:, 1:]
  # The floor keeps a query that attends only to the class token at distance 0, not NaN.
  total = jnp.maximum(weights.sum(axis=-1, keepdims=True), jnp.finfo(weights.dtype).tiny)
  weights = weights / total
  distances = jnp.asarray(patch_distances(grid, patch_px), weights.dtype)
  return (weights * distances).sum(axis=-1).mean(axis=-1)

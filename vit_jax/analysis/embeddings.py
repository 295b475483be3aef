"""Embedding analyses of Fig. 7: position-embedding similarity (centre) and the principal
components of the patch-embedding filters (left)."""
import numpy as np


def patch_position_embeddings(params, has_class_token: bool) -> np.ndarray:
  """[patches, hidden]: the learned position embedding of every patch (class token dropped)."""
  posemb = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])[0]
  return posemb[1:] if has_class_token else posemb


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
  """[n, n] cosine similarity between the rows of `vectors` [n, d]."""
  vectors = np.asarray(vectors, np.float64)
  unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
  return unit @ unit.T


def principal_components(kernel: np.ndarray, num_components: int):
  """Top principal components of the patch-embedding filters.

  `kernel` [P, P, C, D] holds D filters of P*P*C pixels; their principal components (of the
  centred D x P*P*C filter matrix) are returned as [k, P, P, C], k = min(num_components, D,
  P*P*C), with the fraction of the filters' variance each explains [k]. Signs are arbitrary.
  """
  kernel = np.asarray(kernel, np.float64)
  filters = kernel.reshape(-1, kernel.shape[-1]).T
  filters = filters - filters.mean(axis=0)
  _, singular_values, components = np.linalg.svd(filters, full_matrices=False)
  k = min(num_components, len(singular_values))
  variance = singular_values**2
  explained = variance[:k] / variance.sum()
  return components[:k].reshape((k,) + kernel.shape[:-1]), explained

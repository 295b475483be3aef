"""The check that a model's outputs are finite, in every command that computes outputs.

Finite weights can still give Inf or NaN outputs (a head of 1e38 overflows every logit), which
pass silently through an argmax, a softmax or a comparison (`nan > bound` is False).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteOutputError(ValueError):
  """A model with finite weights computed Inf or NaN outputs."""


def first_nonfinite_layer(model, params, images: np.ndarray) -> Optional[str]:
  """The first module, in the order the forward pass finishes them, whose output on `images`
  holds an Inf or NaN, as its parameter path ('Transformer/encoderblock_0/MlpBlock_3/Dense_1',
  'head'); None when every output is finite."""
  names = []  # Filled while tracing, in the order the modules return.

  def finite_outputs(params, images):
    flags = []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      leaves = [leaf for leaf in jax.tree.leaves(out) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
      if context.method_name == '__call__' and leaves:
        names.append('/'.join(context.module.scope.path) or "the model's output")
        flags.append(jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])))
      return out

    with nn.intercept_methods(record):
      model.apply({'params': params}, images, train=False)
    return flags

  flags = jax.device_get(jax.jit(finite_outputs)(params, images))
  return next((name for name, finite in zip(names, flags) if not finite), None)


def check_finite(values: np.ndarray, source: str, *, what: str = 'logits', model=None,
                 params: Any = None, images: Optional[np.ndarray] = None) -> None:
  """Raises NonFiniteOutputError when `values` [n, ...] (the outputs for n images) hold an Inf or
  NaN. `source` (the checkpoint) starts the message; with `model`, `params` and the `images` the
  values came from, the message names the first layer whose output is not finite."""
  values = np.asarray(values)
  bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
  if not bad.any():
    return
  layer = None
  if model is not None and images is not None:
    layer = first_nonfinite_layer(model, params, np.asarray(images)[bad][:1])
  raise_nonfinite(source, what, int(bad.sum()), len(bad), layer)


def raise_nonfinite(source: str, what: str, count: int, total: int,
                    layer: Optional[str] = None) -> None:
  """Raises the NonFiniteOutputError of `count` of `total` images with non-finite `what`."""
  where = f', first in the output of layer {layer}' if layer else ''
  raise NonFiniteOutputError(
      f'{source} computes Inf or NaN {what} for {count} of {total} images{where}, although its '
      'weights are finite (some are too large?): its outputs would be meaningless.')

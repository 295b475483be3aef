"""vit_jax: Vision Transformer (Dosovitskiy et al., 2020) in JAX/Flax.

`vit_jax.load` and `vit_jax.classify` (vit_jax/api.py) are imported on first use, so that
`import vit_jax` stays light (no JAX or TensorFlow until they are called). Importing the package
sets the project's XLA:CPU flags (`vit_jax.xla_flags`) before JAX starts a backend.
"""
from vit_jax import xla_flags as _xla_flags

_xla_flags.set_cpu_xla_flags()
_API = ('load', 'classify')


def __getattr__(name):
  if name in _API:
    from vit_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_API))

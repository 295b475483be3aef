"""The one place where sharding is decided: a 1-D `data` mesh and partition rules.

The batch is always split over `data`. Parameters and optimizer state are either replicated or,
with `fsdp`, split over the same axis along their largest dimension that divides evenly
(FSDP/ZeRO-3 style; XLA inserts the all-gathers and reduce-scatters).
"""
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA = 'data'
STRATEGIES = ('replicate', 'fsdp')
# Leaves smaller than this stay replicated under FSDP: splitting them saves nothing.
FSDP_MIN_SIZE = 2**12


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, num_shards: int) -> P:
  """Splits the largest axis divisible by `num_shards`; replicates small or indivisible leaves."""
  if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, strategy: str):
  """NamedShardings for every leaf of a (params / optimizer / train) state pytree."""
  if strategy not in STRATEGIES:
    raise ValueError(f'config.sharding={strategy!r}; expected one of {STRATEGIES}.')
  if strategy == 'replicate':
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  size = mesh.shape[DATA]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size)), abstract_state)

"""The one place where sharding is decided: a 1-D `data` mesh and partition rules.

The batch is always split over `data`. Parameters and optimizer state are either replicated or,
with `fsdp`, split over the same axis along their largest dimension that divides evenly
(FSDP/ZeRO-3 style; XLA inserts the all-gathers and reduce-scatters). Activations follow the
model's logical axis names (`vit_jax.models.BATCH`), mapped to `data` by `LOGICAL_RULES` while a
step is traced (`with_activation_layout`).
"""
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from vit_jax import models

DATA = 'data'
# The model's logical activation axes -> mesh axes.
LOGICAL_RULES = ((models.BATCH, DATA),)
# Leaves smaller than this stay replicated under FSDP: splitting them saves nothing.
FSDP_MIN_SIZE = 2**12


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_activation_layout(fn, mesh: Mesh):
  """`fn`, tracing its model calls with the logical activation axes (LOGICAL_RULES) laid out
  over `mesh`; wrap a step in it before `jax.jit`."""
  def traced(*args):
    with nn.logical_axis_rules(LOGICAL_RULES), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return traced


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


# config.sharding -> (leaf shape, number of devices) -> the leaf's PartitionSpec.
STRATEGIES = {'replicate': lambda shape, num_shards: P(), 'fsdp': fsdp_spec}


def state_shardings(abstract_state, mesh: Mesh, strategy: str):
  """NamedShardings for every leaf of a (params / optimizer / train) state pytree."""
  spec, size = STRATEGIES[strategy], mesh.shape[DATA]
  return jax.tree.map(lambda x: NamedSharding(mesh, spec(x.shape, size)), abstract_state)

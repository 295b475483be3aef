"""One of several processes that save and restore a globally sharded train state together.

Run by tests/test_state_checkpoint.py as
`python multiprocess_checkpoint_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY`, with
JAX_PLATFORMS=cpu and XLA_FLAGS giving each process its own host devices. Exits non-zero (with
a traceback) when a restored value or sharding is wrong.
"""
import sys

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from vit_jax import state_checkpoint

# Values every process can compute on its own, so that each checks what the others wrote.
KERNEL = np.arange(16 * 6, dtype=np.float32).reshape(16, 6) / 7
BIAS = np.linspace(-1, 1, 6, dtype=np.float32)
STEP = 4


def _global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _abstract(value: np.ndarray, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)


def _check_shards(array: jax.Array, expected: np.ndarray, sharding: NamedSharding) -> None:
  assert array.sharding == sharding, (array.sharding, sharding)
  assert array.addressable_shards, 'this process holds no shard'
  for shard in array.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def main(process_id: int, num_processes: int, port: int, directory: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # Short timeouts: a peer that died should fail this process, not keep it waiting.
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60, heartbeat_timeout_seconds=30,
                             shutdown_timeout_seconds=30)
  assert jax.process_count() == num_processes
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  fsdp = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  rng = np.asarray(jax.random.key_data(jax.random.PRNGKey(3)))
  values = {'step': np.int32(STEP), 'params': {'kernel': KERNEL, 'bias': BIAS}, 'rng': rng}
  saved_shardings = {'step': replicated, 'params': {'kernel': fsdp, 'bias': replicated},
                     'rng': replicated}

  with state_checkpoint.TrainCheckpointer(directory, save_every=2, keep=2) as checkpointer:
    state = jax.tree.map(_global_array, values, saved_shardings)
    assert checkpointer.save(STEP, state)

  # A fresh checkpointer, as after a restart; the kernel comes back replicated instead of split.
  restore_shardings = {'step': replicated, 'params': {'kernel': replicated, 'bias': replicated},
                       'rng': replicated}
  with state_checkpoint.TrainCheckpointer(directory, save_every=2, keep=2) as checkpointer:
    assert checkpointer.latest_step() == STEP
    for shardings in (saved_shardings, restore_shardings):
      restored, step = checkpointer.restore(jax.tree.map(_abstract, values, shardings))
      assert step == STEP, step
      jax.tree.map(_check_shards, restored, values, shardings)

  jax.distributed.shutdown()
  print(f'process {process_id}: ok')


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

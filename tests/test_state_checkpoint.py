"""Training checkpoints: exact round trips, shardings, retention, atomicity, resuming, processes."""
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from vit_jax import state_checkpoint

_REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() == 8, 'conftest should give 8 CPU devices'
  return Mesh(np.asarray(jax.devices()), ('data',))


def _replicated(mesh):
  return NamedSharding(mesh, P())


def _split_rows(mesh):
  return NamedSharding(mesh, P('data'))


def _params():
  return {'dense': {'kernel': jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4) / 3,
                    'bias': jnp.array([0.5, -1.0, 2.0, 0.25], jnp.float32)}}


def _state(params, optimizer, rng):
  """A train state after two optimizer updates, so the optimizer state is not all zeros."""
  opt_state = optimizer.init(params)
  for i in range(2):
    grads = jax.tree.map(lambda p: jnp.cos(p + i), params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return {'step': jnp.int32(2), 'params': params, 'opt_state': opt_state, 'rng': rng}


def _shardings(state, mesh, split_kernels):
  """Replicated, or (FSDP-like) 2-D leaves split over 'data' along their first axis."""
  return jax.tree.map(
      lambda x: _split_rows(mesh) if split_kernels and x.ndim == 2 else _replicated(mesh), state)


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _abstract_like(state):
  return _abstract(state, jax.tree.map(lambda x: x.sharding, state))


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _assert_shardings(tree, shardings):
  for array, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert array.sharding == sharding


@pytest.mark.parametrize('optimizer', [
    optax.sgd(0.1, momentum=0.9),
    optax.adam(1e-2),
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)),
], ids=['sgd_momentum', 'adam', 'clipped_adamw'])
def test_sharded_state_round_trips_exactly(tmp_path, mesh, optimizer):
  state = _state(_params(), optimizer, jax.random.PRNGKey(7))
  shardings = _shardings(state, mesh, split_kernels=True)
  state = jax.device_put(state, shardings)
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=2, keep=3) as checkpointer:
    assert checkpointer.save(2, state)
    checkpointer.wait()
    restored, step = checkpointer.restore(_abstract(state, shardings))
  assert step == 2
  _assert_trees_equal(restored, state)
  _assert_shardings(restored, shardings)


def test_restores_replicated_save_into_split_shardings_and_back(tmp_path, mesh):
  state = _state(_params(), optax.adam(1e-2), jax.random.PRNGKey(0))
  replicated = _shardings(state, mesh, split_kernels=False)
  split = _shardings(state, mesh, split_kernels=True)
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=2) as checkpointer:
    checkpointer.save(1, jax.device_put(state, replicated))
    checkpointer.save(2, jax.device_put(state, split))
    checkpointer.wait()
    as_split, _ = checkpointer.restore(_abstract(state, split), step=1)
    as_replicated, _ = checkpointer.restore(_abstract(state, replicated), step=2)

  _assert_trees_equal(as_split, state)
  _assert_shardings(as_split, split)
  kernel = as_split['params']['dense']['kernel']
  assert {shard.data.shape for shard in kernel.addressable_shards} == {(2, 4)}
  expected_kernel = np.asarray(state['params']['dense']['kernel'])
  for shard in kernel.addressable_shards:
    np.testing.assert_array_equal(shard.data, expected_kernel[shard.index])
  _assert_trees_equal(as_replicated, state)
  _assert_shardings(as_replicated, replicated)


@pytest.mark.parametrize('make_key', [jax.random.PRNGKey, jax.random.key], ids=['raw', 'typed'])
def test_rng_key_round_trips_and_keeps_drawing_the_same_numbers(tmp_path, mesh, make_key):
  state = {'step': jnp.int32(5), 'rng': jax.device_put(make_key(42), _replicated(mesh))}
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=5, keep=1) as checkpointer:
    checkpointer.save(5, state)
    restored, _ = checkpointer.restore(_abstract_like(state))
  assert restored['rng'].dtype == state['rng'].dtype
  np.testing.assert_array_equal(jax.random.uniform(restored['rng'], (4,)),
                                jax.random.uniform(make_key(42), (4,)))


def test_async_save_copies_arrays_before_returning(tmp_path, mesh):
  """A trainer donates the state to the next step right after `save` returns."""
  expected = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)
  state = {'w': jax.device_put(expected, _split_rows(mesh))}
  abstract = _abstract_like(state)
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1) as checkpointer:
    checkpointer.save(1, state)
    state['w'].delete()
    checkpointer.wait()
    restored, _ = checkpointer.restore(abstract)
  np.testing.assert_array_equal(restored['w'], expected)


def test_saves_every_n_steps_and_when_asked_but_never_twice(tmp_path):
  state = {'step': jnp.int32(0)}
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=3, keep=10,
                                          async_save=False) as checkpointer:
    saved = [step for step in range(1, 8)
             if checkpointer.should_save(step) and checkpointer.save(step, state)]
    assert saved == [3, 6]
    assert checkpointer.save(7, state)
    assert not checkpointer.save(7, state)
    assert not checkpointer.save(6, state)
    assert checkpointer.latest_step() == 7
  assert sorted(int(p.name) for p in tmp_path.iterdir()) == [3, 6, 7]


def test_keeps_only_the_last_k_checkpoints(tmp_path):
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=2) as checkpointer:
    for step in range(1, 6):
      checkpointer.save(step, {'step': jnp.int32(step)})
    checkpointer.wait()
    assert checkpointer.latest_step() == 5
    with pytest.raises(FileNotFoundError, match=r'step 3 .*available steps: \[4, 5\]'):
      checkpointer.restore(_abstract_like({'step': jnp.int32(0)}), step=3)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['4', '5']

  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=2) as reopened:
    state, step = reopened.restore(_abstract_like({'step': jnp.int32(0)}))
  assert (int(state['step']), step) == (5, 5)


def test_half_written_checkpoint_is_ignored_and_redone(tmp_path):
  """A process killed mid-save leaves an uncommitted `<step>.orbax-checkpoint-tmp` directory."""
  abstract = _abstract_like({'w': jnp.zeros((8, 8))})
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=3, keep=5) as checkpointer:
    checkpointer.save(3, {'w': jnp.full((8, 8), 3.0)})
    checkpointer.save(6, {'w': jnp.full((8, 8), 6.0)})
  # Turn step 6 into what a crash before the commit leaves: data written, nothing committed,
  # some files cut short.
  half_written = tmp_path / '6.orbax-checkpoint-tmp'
  (tmp_path / '6').rename(half_written)
  commit_markers = list(half_written.rglob('commit_success.txt'))
  assert commit_markers, 'orbax should mark committed local checkpoints too'
  for marker in commit_markers:
    marker.unlink()
  for data_file in (half_written / 'state').rglob('*'):
    if data_file.is_file():
      data = data_file.read_bytes()
      data_file.write_bytes(data[:len(data) // 2])

  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=3, keep=5) as restarted:
    assert restarted.latest_step() == 3
    state, step = restarted.restore(abstract)
    assert step == 3
    np.testing.assert_array_equal(state['w'], np.full((8, 8), 3.0))

    assert restarted.save(6, {'w': jnp.full((8, 8), 60.0)})
    restarted.wait()
    state, step = restarted.restore(abstract)
  assert step == 6
  np.testing.assert_array_equal(state['w'], np.full((8, 8), 60.0))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['3', '6']


def test_a_reader_leaves_a_save_in_progress_alone(tmp_path):
  """An evaluator opening the directory must not delete what a running trainer is writing."""
  abstract = _abstract_like({'w': jnp.zeros((8, 8))})
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=3, keep=5) as trainer:
    trainer.save(3, {'w': jnp.full((8, 8), 3.0)})
  in_progress = tmp_path / '6.orbax-checkpoint-tmp' / 'state'
  in_progress.mkdir(parents=True)
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=3, keep=5) as reader:
    state, step = reader.restore(abstract)
  assert step == 3
  np.testing.assert_array_equal(state['w'], np.full((8, 8), 3.0))
  assert in_progress.is_dir()


def test_save_every_0_saves_only_when_asked(tmp_path):
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=0, keep=2) as checkpointer:
    assert not any(checkpointer.should_save(step) for step in range(1, 20))
    checkpointer.save(20, {'w': jnp.ones(3)})
    checkpointer.wait()
    assert checkpointer.latest_step() == 20


def test_errors_are_explicit(tmp_path):
  with pytest.raises(ValueError, match='save_every=-1'):
    state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=-1, keep=1)
  with pytest.raises(ValueError, match='keep=0'):
    state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=0)
  state = {'params': {'w': jnp.zeros(3)}}
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1) as checkpointer:
    with pytest.raises(FileNotFoundError, match='No complete training checkpoint'):
      checkpointer.restore(_abstract_like(state))
    checkpointer.save(1, state)
    checkpointer.wait()
    without_sharding = {'params': {'w': jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with pytest.raises(ValueError, match=r"missing for: \['params'\]\['w'\]"):
      checkpointer.restore(without_sharding)


# A tiny trainer: linear regression with adam, a stream of batches indexed by the number of
# batches consumed (like the input pipeline) and a PRNG key in the state that adds noise.
_DATA_X = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
_DATA_Y = _DATA_X @ np.array([1.5, -2.0, 0.5], np.float32) + 0.3
_BATCH = 8
_OPTIMIZER = optax.adam(0.3)


def _initial_state(mesh):
  params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
  state = {'step': jnp.int32(0), 'params': params, 'opt_state': _OPTIMIZER.init(params),
           'rng': jax.random.PRNGKey(0)}
  return jax.device_put(state, _replicated(mesh))


@jax.jit
def _train_step(state, x, y):
  rng, noise_rng = jax.random.split(state['rng'])

  def loss_fn(params):
    noisy_x = x + 0.01 * jax.random.normal(noise_rng, x.shape)
    return jnp.mean((noisy_x @ params['w'] + params['b'] - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state['params'])
  updates, opt_state = _OPTIMIZER.update(grads, state['opt_state'], state['params'])
  return {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
          'opt_state': opt_state, 'rng': rng}, loss


def _train(checkpointer, state, last_step):
  """Runs steps up to `last_step` (batch i after i steps); returns the state and {step: loss}."""
  losses = {}
  for step in range(int(state['step']) + 1, last_step + 1):
    rows = np.arange((step - 1) * _BATCH, step * _BATCH) % len(_DATA_X)
    state, loss = _train_step(state, _DATA_X[rows], _DATA_Y[rows])
    losses[step] = float(loss)
    if checkpointer.should_save(step):
      checkpointer.save(step, state)
  return state, losses


def test_resumed_training_matches_uninterrupted_training_exactly(tmp_path, mesh):
  with state_checkpoint.TrainCheckpointer(str(tmp_path / 'a'), save_every=3, keep=2) as ckpt:
    uninterrupted, expected_losses = _train(ckpt, _initial_state(mesh), last_step=10)

  # "Crash" after step 7: no final save; the new checkpointer below is the restarted job.
  with state_checkpoint.TrainCheckpointer(str(tmp_path / 'b'), save_every=3, keep=2) as ckpt:
    _, losses_before_crash = _train(ckpt, _initial_state(mesh), last_step=7)
  with state_checkpoint.TrainCheckpointer(str(tmp_path / 'b'), save_every=3, keep=2) as ckpt:
    state, step = ckpt.restore(_abstract_like(_initial_state(mesh)))
    assert (step, int(state['step'])) == (6, 6)
    resumed, losses_after_restart = _train(ckpt, state, last_step=10)

  assert expected_losses[10] < expected_losses[1] / 2  # It trains: the comparisons mean something.
  assert losses_before_crash == {s: expected_losses[s] for s in range(1, 8)}
  assert losses_after_restart == {s: expected_losses[s] for s in range(7, 11)}
  _assert_trees_equal(resumed, uninterrupted)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_save_and_restore_a_globally_sharded_state(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(_REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  port = _free_port()
  workers = [
      subprocess.Popen(
          [sys.executable, str(_REPO / 'tests' / 'multiprocess_checkpoint_worker.py'),
           str(process_id), '2', str(port), str(tmp_path / 'checkpoints')],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for process_id in range(2)]
  try:
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
  except subprocess.TimeoutExpired:
    for worker in workers:
      worker.kill()
    outputs = [worker.communicate()[0] for worker in workers]
    pytest.fail('checkpoint worker processes timed out:\n' +
                '\n'.join(output[-2000:] for output in outputs))
  for process_id, (worker, output) in enumerate(zip(workers, outputs)):
    assert worker.returncode == 0, f'process {process_id} failed:\n{output[-4000:]}'
    assert f'process {process_id}: ok' in output
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['4']


def test_a_save_that_cannot_be_written_keeps_the_previous_checkpoint(tmp_path):
  """Disk full while saving. Writes really fail here: files may not grow past 1 KiB
  (RLIMIT_FSIZE, so the OS answers EFBIG where a full disk answers ENOSPC)."""
  directory = str(tmp_path / 'checkpoints')
  noise = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)  # Incompressible.
  state = lambda value: {'w': jax.device_put(jnp.asarray(noise + value))}  # 16 KiB
  checkpointer = state_checkpoint.TrainCheckpointer(directory, save_every=1, keep=3)
  checkpointer.save(1, state(1.0))
  checkpointer.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Else the process is killed.
  resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
  try:
    with pytest.raises(state_checkpoint.CheckpointSaveError,
                       match=r'for step 2 to .*checkpoints failed: .* The last complete '
                             r'checkpoint \(step 1\) is kept\.'):
      checkpointer.save(2, state(2.0))
      checkpointer.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)
  checkpointer.close()
  with state_checkpoint.TrainCheckpointer(directory, save_every=1, keep=3) as reader:
    assert reader.latest_step() == 1
    restored, step = reader.restore(_abstract_like(state(0.0)))
  assert step == 1
  np.testing.assert_array_equal(restored['w'], noise + 1.0)

"""Real `python -m vit_jax.main` runs on one workdir: the lock, and starts that fail.

Two runs on one workdir used to interleave their metrics.jsonl; a start that failed (a bad batch,
a restore that failed) used to leave a config.json that refused the corrected command.
"""
import socket

import pytest

from tests.test_fault_tolerance import _Cli
from tests.test_fault_tolerance import _env
from tests.test_fault_tolerance import _losses

# A short run: 6 steps, checkpoints at 3 and 6.
SHORT = ('--config.total_steps=6', '--config.checkpoint_every=3', '--config.eval_every=6')


@pytest.fixture(scope='module')
def env(tmp_path_factory) -> dict:
  """The runs' environment, with one compilation cache for all of them."""
  return _env(tmp_path_factory.mktemp('jax_cache'))


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, env):
  endless = ('--config.total_steps=1000000', '--config.checkpoint_every=1000000')
  first = _Cli(tmp_path, 'first', 'workdir', *endless, env=env)
  first.wait_for_step(2)
  second = _Cli(tmp_path, 'second', 'workdir', *endless, env=env)
  assert second.finish() == 2, second.stderr[-3000:]
  assert (f'Error: {first.workdir} is in use by host {socket.gethostname()} pid '
          f'{first.process.pid} since ') in second.stderr
  assert 'Traceback' not in second.stderr
  # The first run's curve, each step once: the refused run neither rewound nor appended.
  steps = [step for step, _ in _losses(first.workdir)]
  assert steps == list(range(1, len(steps) + 1))
  first.process.kill()
  first.finish()
  third = _Cli(tmp_path, 'third', 'workdir', *SHORT, '--config.allow_config_change=True',
               env=env)
  assert third.finish() == 0, third.stderr[-3000:]
  assert (f'Taking over {first.workdir}/lock: it names host {socket.gethostname()} pid '
          f'{first.process.pid}') in third.stderr
  assert [step for step, _ in _losses(third.workdir)] == list(range(1, 7))
  assert not (third.workdir / 'lock').exists()


def test_a_failed_start_changes_nothing_on_disk(tmp_path, env):
  bad_batch = _Cli(tmp_path, 'bad_batch', 'workdir', *SHORT, '--config.batch=0', env=env)
  assert bad_batch.finish() == 2, bad_batch.stderr[-3000:]
  assert not bad_batch.workdir.exists()
  corrected = _Cli(tmp_path, 'corrected', 'workdir', *SHORT, env=env)
  assert corrected.finish() == 0, corrected.stderr[-3000:]
  files = {path: path.read_bytes() for path in corrected.workdir.iterdir() if path.is_file()}
  # A changed model is allowed, but its restore fails: config.json and metrics stay as they were.
  other_model = _Cli(tmp_path, 'other_model', 'workdir', *SHORT, '--config.model.hidden_size=8',
                     '--config.allow_config_change=True', env=env)
  assert other_model.finish() == 2, other_model.stderr[-3000:]
  assert 'Error: The 2 training checkpoints' in other_model.stderr
  assert 'belong to another model config' in other_model.stderr
  assert {path: path.read_bytes() for path in corrected.workdir.iterdir()
          if path.is_file()} == files

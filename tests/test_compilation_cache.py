"""The persistent compilation cache of training runs (vit_jax.compilation_cache)."""
import os

import jax
import pytest

from tests import fault_tolerance_config
from tests import train_fixtures
from vit_jax import hardware
from vit_jax import compilation_cache
from vit_jax import train_loop
from vit_jax import trainer as trainer_lib


@pytest.fixture
def cache_settings():
  """Restores JAX's cache settings (the process's other tests compile without a cache)."""
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # Cache even tiny steps.
  yield
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_time)
  compilation_cache.compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', None)


def test_a_second_start_loads_the_train_step_from_the_workdir_cache(tmp_path, cache_settings):
  del cache_settings
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **kw: hits.append(event) if event.endswith('/cache_hits') else None)
  config = train_fixtures.tiny_config()
  config.num_classes = 10
  workdir = str(tmp_path / 'workdir')
  for start in range(2):  # Two starts of the same run in one process: caches cleared between.
    jax.clear_caches()
    restore = compilation_cache.enable(config, workdir)
    assert jax.config.jax_compilation_cache_dir == os.path.join(workdir, 'compilation_cache')
    trainer = trainer_lib.Trainer(config, 10)
    trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch).compile()
    assert os.listdir(os.path.join(workdir, 'compilation_cache'))
    assert bool(hits) == (start == 1)  # The first start compiles, the second loads.
    restore()
    assert jax.config.jax_compilation_cache_dir is None


def test_a_run_leaves_the_process_cache_setting_as_it_found_it(tmp_path, cache_settings,
                                                               monkeypatch):
  """A run's cache is its own: after it, and after a start that fails, the process's next
  compile goes where it went before, not into a workdir that may be deleted."""
  del cache_settings
  elsewhere = str(tmp_path / 'elsewhere')
  jax.config.update('jax_compilation_cache_dir', elsewhere)
  config = fault_tolerance_config.get_config()
  config.total_steps = config.eval_every = config.checkpoint_every = 2
  train_loop.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert os.listdir(tmp_path / 'workdir' / 'compilation_cache')
  assert jax.config.jax_compilation_cache_dir == elsewhere
  monkeypatch.setenv(hardware.MEMORY_LIMIT_ENV, '1e-6')  # Refused after the cache is set.
  with pytest.raises(ValueError, match='Out of memory'):
    train_loop.prepare(config, str(tmp_path / 'other'))
  assert jax.config.jax_compilation_cache_dir == elsewhere


def test_the_cache_goes_elsewhere_or_off(tmp_path):
  config = train_fixtures.tiny_config()
  assert compilation_cache.directory(config, 'gs://b/w') == 'gs://b/w/compilation_cache'
  config.compilation_cache_dir = str(tmp_path)
  assert compilation_cache.directory(config, 'gs://b/w') == str(tmp_path)
  config.compilation_cache_dir = ''
  assert compilation_cache.directory(config, 'gs://b/w') is None

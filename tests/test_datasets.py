"""TFDS datasets that are not prepared yet: prepared on first use, or one `Error:` line naming
the dataset, its data_dir and the fix (exit 2)."""
import os
import subprocess
import sys

from tests import unprepared_datasets_config
from vit_jax import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'tests', 'unprepared_datasets_config.py')


def _main(tmp_path, name, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "work"}',
       f'--config={CONFIG}:{name}', f'--config.data_dir={tmp_path / "tfds"}', *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_failed_download_names_dataset_data_dir_and_tfds_build(tmp_path):
  result = _main(tmp_path, 'download')
  assert result.returncode == 2, result.stderr[-3000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("Error: Cannot prepare TFDS dataset 'unprepared_download_test/1.0.0' "
                          f'in data_dir {tmp_path / "tfds"} (')
  assert (f'run `tfds build unprepared_download_test --data_dir={tmp_path / "tfds"}` and copy '
          f'{tmp_path / "tfds"}/unprepared_download_test here.') in error
  assert 'Traceback' not in result.stderr


def test_missing_manual_files_name_tfds_manual_dir_and_the_instructions(tmp_path):
  result = _main(tmp_path, 'manual', f'--config.tfds_manual_dir={tmp_path / "manual"}')
  assert result.returncode == 2, result.stderr[-3000:]
  error = result.stderr.strip().splitlines()[-1]
  assert "Cannot prepare TFDS dataset 'unprepared_manual_test/1.0.0'" in error
  assert (f'its files must be downloaded by hand into config.tfds_manual_dir (now '
          f'{tmp_path / "manual"}): Put images.tar (from example.org) in the manual dir.') in error


def test_a_dataset_that_needs_no_download_is_prepared_on_first_use(tmp_path):
  config = unprepared_datasets_config.get_config('generated')
  config.data_dir = str(tmp_path)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples) == (2, 16)
  assert os.path.isdir(tmp_path / 'unprepared_generated_test' / '1.0.0')
  batch = next(input_pipeline.build_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (8, 16, 16, 3)

"""AugReg checkpoints by short name, resolved offline through an index.csv fixture in the
bucket's format (tests/data/augreg_index.csv: the real columns, a few made-up rows)."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from vit_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
INDEX = ROOT / 'tests' / 'data' / 'augreg_index.csv'
# Of B_16's i21k rows the medium2 one has the best final_val (0.4685 > 0.4612); the i1k
# (0.7795) and i21k_30 (0.4701) rows are other pre-training data, B_32 another model.
BEST_B16 = 'B_16-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0'


def test_short_names_select_the_best_i21k_pretraining():
  assert checkpoint.resolve_augreg('augreg:B_16', str(INDEX)) == (BEST_B16, 'ViT-B_16')
  assert checkpoint.resolve_augreg('B_32', str(INDEX))[0].startswith(
      'B_32-i21k-300ep-lr_0.001-aug_light1')
  assert checkpoint.resolve_augreg('R26_S_32', str(INDEX))[1] == 'R26+ViT-S_32'
  full = 'B_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.1-sd_0.1'
  assert checkpoint.resolve_augreg(f'augreg:{full}') == (full, 'ViT-B_16')  # Needs no index.


@pytest.mark.parametrize('spec, message', [
    ('augreg:S_16', "No i21k AugReg checkpoint of 'S_16'; the index has B_16, B_32, R26_S_32."),
    ('augreg:Q_16', "AugReg model 'Q_16' has no model config here"),
])
def test_unknown_short_names_raise(spec, message):
  with pytest.raises(ValueError, match=message):
    checkpoint.resolve_augreg(spec, str(INDEX))


def test_augreg_config_points_at_the_selected_checkpoint(tmp_path, monkeypatch):
  (tmp_path / 'checkpoints' / 'augreg').mkdir(parents=True)
  shutil.copy(INDEX, tmp_path / 'checkpoints' / 'augreg' / 'index.csv')
  monkeypatch.chdir(tmp_path)
  spec = importlib.util.spec_from_file_location('augreg_config', ROOT / 'configs' / 'augreg.py')
  augreg_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(augreg_config)
  config = augreg_config.get_config('B_16,cifar10')
  assert config.model.model_name == 'ViT-B_16' and config.dataset == 'cifar10'
  assert config.pretrained_path == f'checkpoints/augreg/{BEST_B16}.npz'
  assert config.model.transformer.dropout_rate == 0.0


def test_fetch_command_downloads_the_index_then_the_selected_checkpoint(tmp_path):
  bucket = tmp_path / 'bucket' / 'augreg'
  bucket.mkdir(parents=True)
  shutil.copy(INDEX, bucket / 'index.csv')
  (bucket / f'{BEST_B16}.npz').write_bytes(b'stand-in for the checkpoint')
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.weights', 'fetch', 'augreg:B_16',
       f'--dest={tmp_path / "ckpt"}', f'--base_url=file://{tmp_path / "bucket"}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'ckpt' / 'augreg' / 'index.csv').read_text() == INDEX.read_text()
  assert (tmp_path / 'ckpt' / 'augreg' / f'{BEST_B16}.npz').read_bytes() == (
      b'stand-in for the checkpoint')

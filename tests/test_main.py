"""The command line end to end on the real Fashion-MNIST files: train, eval, resume, export."""
import glob
import json
import os
import subprocess
import sys

from flax import traverse_util
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.transformer.num_layers=1', '--config.model.hidden_size=16',
        '--config.model.transformer.mlp_dim=32', '--config.model.transformer.num_heads=2',
        '--config.model.representation_size=16', '--config.batch=32',
        '--config.batch_eval=1000', '--config.log_every=2', '--config.eval_every=3',
        '--config.checkpoint_every=3', '--config.warmup_steps=1', '--config.test_split=test[:500]']


def _main(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
       '--config=configs/demo.py:pretrain', *TINY, *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  _main(workdir, '--config.total_steps=6', '--config.profile_steps=2')
  return workdir


def test_train_writes_metrics_checkpoints_and_npz(trained):
  events = workdir_lib.read_metrics(trained)
  train_steps = [e['step'] for e in events if 'loss' in e]
  eval_steps = [e['step'] for e in events if 'eval_top1' in e]
  assert train_steps == [2, 4, 6] and eval_steps == [3, 6]
  for e in events:
    if 'loss' in e:
      assert {'loss', 'accuracy', 'lr', 'grad_norm', 'images_per_s', 'eta_s'} <= set(e)
  assert all(0.0 <= e['eval_top1'] <= 1.0 for e in events if 'eval_top1' in e)
  # Minival periodically, the test split once at the end.
  assert [e['step'] for e in events if 'test_top1' in e] == [6]
  with open(os.path.join(trained, 'config.json')) as f:
    splits = {k: v for k, v in json.load(f).items() if k.endswith('_split')}
  assert splits == {'train_split': 'train[:98%]', 'eval_split': 'train[98%:]',
                    'test_split': 'test[:500]'}
  assert sorted(os.listdir(os.path.join(trained, 'checkpoints')))[:2] == ['3', '6']
  assert os.listdir(os.path.join(trained, 'tensorboard'))
  # --config.profile_steps=2: one jax.profiler trace, in TensorBoard's profile-plugin layout.
  traces = glob.glob(os.path.join(trained, 'tensorboard', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with open(os.path.join(trained, 'config.json')) as f:
    config = json.load(f)
  assert config['num_classes'] == 10 and config['pp']['resolution'] == 21
  params = traverse_util.flatten_dict(checkpoint.load(os.path.join(trained, 'model.npz')),
                                      sep='/')
  assert params['head/kernel'].shape == (16, 10)
  # A 3x3 grid at 21px with 7x7 patches; global average pooling, so no class token.
  assert params['Transformer/posembed_input/pos_embedding'].shape == (1, 3 * 3, 16)
  assert params['embedding/kernel'].dtype == np.float32


def test_eval_of_the_exported_npz_reproduces_the_final_accuracy(trained):
  out = _main(trained, '--mode=eval', f'--checkpoint={trained}/model.npz')
  (final,) = [e for e in workdir_lib.read_metrics(trained) if 'test_top1' in e]
  assert f"eval_top1={final['eval_top1']:.4f} test_top1={final['test_top1']:.4f}" in out


def test_extending_a_finished_run_resumes_from_its_latest_checkpoint(trained, tmp_path):
  resumed = str(tmp_path / 'resumed')
  os.makedirs(resumed)
  subprocess.run(['cp', '-r', *[os.path.join(trained, f) for f in os.listdir(trained)],
                  resumed], check=True)
  # A longer schedule is a config change, accepted only when asked for.
  _main(resumed, '--config.total_steps=8', '--config.allow_config_change=True')
  events = workdir_lib.read_metrics(resumed)
  steps = [e['step'] for e in events if 'loss' in e]
  assert steps == [2, 4, 6, 8]  # steps 1-6 were not trained again
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints')))[-1] == '8'

"""`python -m vit_jax.sweep` end to end at a tiny size (Fashion-MNIST, one-block ViT, 4 steps)."""
import json
import os
import subprocess
import sys

import pytest

from vit_jax import sweep
from vit_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=tests/fault_tolerance_config.py', '--config.total_steps=4',
        '--config.warmup_steps=1', '--config.log_every=2', '--config.eval_every=4',
        '--config.checkpoint_every=0', '--config.train_split=train[:256]',
        '--config.eval_split=train[512:544]', '--config.test_split=test[:64]']


def _sweep(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'vit_jax.sweep', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_sweep_fine_tunes_each_lr_picks_on_minival_and_resumes(tmp_path):
  workdir = str(tmp_path / 'sweep')
  first = _sweep(*TINY, '--base_lrs=0.01,0.0001', f'--workdir={workdir}')
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(workdir, 'sweep.json')) as f:
    summary = json.load(f)
  assert [run['base_lr'] for run in summary['runs']] == [0.0001, 0.01]
  for run in summary['runs']:
    (final,) = [e for e in workdir_lib.read_metrics(run['workdir']) if 'test_top1' in e]
    assert final['step'] == 4
    assert (run['eval_top1'], run['test_top1']) == (final['eval_top1'], final['test_top1'])
    with open(os.path.join(run['workdir'], 'config.json')) as f:
      assert json.load(f)['base_lr'] == run['base_lr']
    # checkpoint_every=0: no periodic checkpoint, only the final one.
    assert os.listdir(os.path.join(run['workdir'], 'checkpoints')) == ['4']
  best = max(summary['runs'], key=lambda run: (run['eval_top1'], -run['base_lr']))
  assert summary['chosen_base_lr'] == best['base_lr']
  assert summary['chosen_test_top1'] == best['test_top1']
  with open(os.path.join(workdir, 'sweep.md')) as f:
    table = f.read()
  assert first.stdout == table
  assert f'Chosen base_lr={best["base_lr"]:g}' in table and f'{best["test_top1"]:.2%}' in table
  again = _sweep(*TINY, '--base_lrs=0.01,0.0001', f'--workdir={workdir}')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout == first.stdout
  assert again.stderr.count('reusing the finished run') == 2


def test_choose_takes_the_best_minival_and_the_smaller_lr_on_a_tie():
  results = {0.03: {}, 0.01: {'eval_top1': 0.5}, 0.001: {'eval_top1': 0.5},
             0.003: {'eval_top1': 0.4}}
  assert sweep.choose(results) == 0.001
  assert sweep.choose({0.03: {}}) is None


@pytest.mark.parametrize('lrs, message', [('0.01,abc', "'abc' is not a positive number"),
                                          ('0.01,-1', "'-1' is not a positive number"),
                                          ('0.01,0.01', 'give distinct learning rates')])
def test_bad_base_lrs_are_one_error_line(lrs, message):
  with pytest.raises(sweep.cli.UserError, match=message):
    sweep.parse_base_lrs(lrs.split(','))

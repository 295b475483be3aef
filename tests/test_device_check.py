"""scripts/device_check.sh: its dry run (the same parts on the CPU at a tiny size, TensorFlow
blocked) writes every JSON file with passing checks; the model, the benchmark and what they
import need no TensorFlow."""
import json
import os
import pathlib
import subprocess
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]

# As on accelerator images without TensorFlow: a None entry in sys.modules fails every import.
_WITHOUT_TENSORFLOW = '''
import sys
sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None
import vit_jax.models, vit_jax.benchmark, vit_jax.benchmark_lib, vit_jax.trainer
import vit_jax.compare_timm
print('imported', sorted(m for m in sys.modules if m.startswith('vit_jax')))
'''


def _env():
  return {**os.environ, 'PYTHONPATH': str(_REPO)}


def test_models_and_benchmark_import_without_tensorflow():
  result = subprocess.run([sys.executable, '-c', _WITHOUT_TENSORFLOW], capture_output=True,
                          text=True, env=_env(), cwd=_REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "'vit_jax.trainer'" in result.stdout and "'vit_jax.checkpoint'" in result.stdout


def test_the_blocker_does_block():  # Else the test above could not fail.
  code = _WITHOUT_TENSORFLOW.replace('import vit_jax.models', 'import vit_jax.input_pipeline\n#')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=_env(), cwd=_REPO, check=False)
  assert result.returncode != 0 and 'tensorflow' in result.stderr


def test_dry_run_writes_every_part(tmp_path):
  out = tmp_path / 'out'
  result = subprocess.run(['bash', str(_REPO / 'scripts/device_check.sh'), str(out), '--dry_run'],
                          capture_output=True, text=True, env=_env(), check=False, timeout=1200)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['dry_run'] and summary['tensorflow_blocked']
  for name in ('checks', 'train', 'inference', 'max_batch'):
    assert summary['parts'][name]['status'] == 'ok', (name, summary['parts'][name])
    assert (out / f'{name}.json').exists()
  assert summary['parts']['timm']['status'] in ('ok', 'skipped')
  checks = json.loads((out / 'checks.json').read_text())
  assert len(checks) == 8 and all(c['ok'] for c in checks), checks
  assert checks[-1]['update_norm'] > 0  # Accumulation compares real (non-zero) updates.
  (train,) = json.loads((out / 'train.json').read_text())
  assert (train['mode'], train['dtype'], train['attention_impl']) == ('train', 'bfloat16', 'fused')
  assert json.loads((out / 'max_batch.json').read_text())['max_batch_per_device'] >= 4
  assert 'device_check: all parts ok' in (out / 'device_check.log').read_text()


def test_usage_errors_exit_2(tmp_path):
  for args in ([], [str(tmp_path), '--bogus']):
    result = subprocess.run(['bash', str(_REPO / 'scripts/device_check.sh'), *args],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stderr.startswith('Error: '), result.stderr

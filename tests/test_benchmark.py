"""vit_jax.benchmark at a tiny size: every figure is printed and written as JSON, in both modes,
and the max-batch search is consistent. Speed itself is never asserted."""
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import types

from absl import app
from absl import flags
import jax
import pytest

from tests.test_analysis import parse_flags
from vit_jax import benchmark
from vit_jax import benchmark_lib
from vit_jax import flops
from vit_jax import model_configs
from vit_jax import models
from vit_jax import sharding
from vit_jax import trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--model=micro', '--resolution=32', '--batch=2', '--steps=2', '--num_devices=1']
PRINTED_FIGURES = ('images/s', 'achieved TFLOP/s', 'MFU', 'GFLOP/image', 'lower', 'compile',
                   'peak memory', 'XLA program')


def parse(argv) -> flags.FlagValues:
  return parse_flags(benchmark.define_flags, argv)


def run_command(argv) -> dict:
  return benchmark.run(parse(argv), argv)


def _main(tmp_path, capsys, *extra):
  path = tmp_path / 'out.json'
  run_command([*TINY, f'--json_out={path}', *extra])
  printed = capsys.readouterr().out
  data = json.loads(path.read_text())
  assert set(data['machine']) >= {'backend', 'device_kind', 'host_cpu', 'host_vector_isa', 'jax'}
  (row,) = data['results']
  assert set(row) == set(benchmark_lib.ROW_KEYS)
  for figure in PRINTED_FIGURES:
    assert figure in printed, figure
  for key in ('images_per_s', 'step_time_s', 'flops_per_image', 'achieved_tflops', 'lower_s',
              'compile_s', 'peak_memory_bytes'):
    assert row[key] > 0, key
  assert len(row['step_times_s']) == 2
  assert row['peak_memory_source'] in ('device peak_bytes_in_use', 'host max RSS')
  assert row['xla_memory']['total'] > 0
  assert (row['batch'], row['batch_per_device'], row['num_devices']) == (2, 2, 1)
  return row, printed


def test_inference_prints_and_writes_every_figure_with_the_pipeline(tmp_path, capsys):
  row, printed = _main(tmp_path, capsys, '--with_pipeline', '--pipeline_steps=2',
                       '--pipeline_shuffle_buffer=64')
  assert (row['mode'], row['model'], row['resolution']) == ('inference', 'micro', 32)
  assert row['pipeline_images_per_s'] > 0
  assert 'pipeline images/s' in printed
  if jax.default_backend() == 'cpu':  # No known peak for CPUs: MFU is null, and says why.
    assert row['mfu'] is None and row['peak_flops_per_device'] is None
    assert 'peak FLOP/s unknown' in printed


def test_pipeline_config_times_a_training_configs_own_pipeline(capsys):
  out = run_command([f'--pipeline_config={REPO}/tests/fault_tolerance_config.py',
                     '--pipeline_steps=2'])
  assert out['pipeline']['images_per_s'] > 0
  assert (out['pipeline']['dataset'], out['pipeline']['local_batch']) == ('fashion_mnist', 16)
  assert 'fashion_mnist train[:512] @ 16px' in capsys.readouterr().out
  assert 'results' not in out  # No model is timed.


def test_train_step_with_every_switch_and_peak_override(tmp_path, capsys):
  row, printed = _main(tmp_path, capsys, '--mode=train', '--peak_flops=1e12', '--scan',
                       '--remat=full', '--attention=fused')
  assert (row['mode'], row['optimizer'], row['sharding']) == ('train', 'sgd', 'replicate')
  assert (row['scan_layers'], row['remat_policy'], row['attention_impl']) == (
      True, 'full', 'fused')
  assert row['peak_flops_per_device'] == 1e12
  assert row['mfu'] == pytest.approx(row['achieved_tflops'] * 1e12 / 1e12)
  # A train step is 3x the forward FLOPs.
  assert row['flops_per_image'] == pytest.approx(
      3 * flops.forward_flops(model_configs.get_model_config('micro'), 32))
  assert row['xla_memory']['alias'] > 0  # The donated state is updated in place.
  assert 'MFU' in printed and 'n/a' not in printed.split('MFU')[1].split('\n')[0]


def test_the_switches_reach_the_real_trainer():
  spec = benchmark_lib.Spec(model='micro', resolution=32, batch=2, mode='train', scan_layers=True,
                        remat_policy='dots_saveable', attention_impl='fused', num_devices=1)
  trainer = trainer_lib.Trainer(benchmark_lib.run_config(spec), 10,
                                mesh=sharding.make_mesh(jax.devices()[:1]))
  model = trainer.model
  assert (model.scan_layers, model.remat_policy, model.attention_impl) == (
      True, 'dots_saveable', 'fused')
  assert 'encoderblock' in trainer.abstract_state['params']['Transformer']


def _doubling_and_bisection_probes(size, limit, start):
  count, good, bad, n = 0, 0, None, start
  while bad is None or bad - good > 1:
    count += 1
    good, bad = (n, bad) if size(n) <= limit else (good, n)
    n = 2 * good if bad is None else (good + bad) // 2
  return count


@pytest.mark.parametrize('per_image,limit,known_limit', [
    (0.2, 15.0, True), (0.2, 3.0, True), (0.2, 40.0, False), (0.7, 1.5, True), (3.0, 1.1, True)])
def test_largest_fitting_finds_the_threshold_in_few_probes(per_image, limit, known_limit):
  """Bytes = 1 + per_image * n + a wobble (XLA's buffers are not exactly linear); the answer is
  the brute-force largest fit, the failure one above it, in fewer probes than doubling and
  bisection need (a limit unknown to the search: told 16, it never learns the real one)."""
  size = lambda n: 1 + per_image * n + 0.05 * (n % 3)
  probed = []

  def probe(n):
    probed.append(n)
    return size(n) <= limit, size(n), limit if known_limit else 16.0
  good, bad = benchmark_lib.largest_fitting(probe, start=4, cap=4096)
  expected = max([n for n in range(0, 4097) if n == 0 or size(n) <= limit])
  assert (good, bad) == (expected, expected + 1)
  assert len(probed) == len(set(probed)) <= _doubling_and_bisection_probes(size, limit, 4)
  assert benchmark_lib.largest_fitting(lambda n: (True, None, None), start=3, cap=100) == (100, None)
  good, bad = benchmark_lib.largest_fitting(probe, start=4, cap=4096, relative_granularity=0.1)
  assert good <= expected < bad <= good + max(1, good // 10)


def test_find_max_batch_doubles_then_bisects_consistently(tmp_path, capsys):
  spec = benchmark_lib.Spec(model='micro', resolution=32, batch=2, num_devices=1)
  capped = benchmark_lib.find_max_batch(spec, memory_limit_bytes=2**40, cap=8)
  assert capped['max_batch_per_device'] == 8 and capped['capped']
  sizes = {p['batch_per_device']: p['bytes'] for p in capped['probes']}
  assert sorted(sizes) == [2, 4, 8] and sizes[2] < sizes[4] < sizes[8]
  # A limit between the sizes at 2 and 4: the answer is 2 or 3, and answer + 1 fails.
  limit = (sizes[2] + sizes[4]) // 2
  result = benchmark_lib.find_max_batch(spec, memory_limit_bytes=limit, cap=64)
  best = result['max_batch_per_device']
  assert 2 <= best < 4 and not result['capped']
  for probe in result['probes']:
    assert probe['fits'] == (probe['bytes'] <= limit) == (probe['batch_per_device'] <= best)
  assert best + 1 in [p['batch_per_device'] for p in result['probes']]
  # The CLI prints the answer and writes the probes; `run` probes execute a step.
  path = tmp_path / 'max.json'
  run_command([*TINY, '--find_max_batch', '--max_batch_method=run', '--max_batch_cap=2',
               f'--json_out={path}'])
  (written,) = json.loads(path.read_text())['max_batch']
  assert written['method'] == 'run' and written['max_batch_per_device'] == 2
  assert written['probes'][0]['fits']
  assert 'max batch/device 2' in capsys.readouterr().out


def test_presets_and_bad_arguments():
  specs = benchmark.specs_from_flags(parse(['--num_devices=1']))
  assert [(s.model, s.resolution, s.batch, s.dtype) for s in specs] == [
      ('ViT-Ti_16', 224, 8, 'float32'), ('ViT-S_16', 224, 8, 'float32')]
  specs = benchmark.specs_from_flags(parse(['--preset=gpu', '--num_devices=1', '--mode=train']))
  assert {(s.model, s.resolution) for s in specs} == {
      (m, r) for m in ('ViT-B_16', 'ViT-L_16') for r in (224, 384)}
  assert all(s.dtype == 'bfloat16' and s.mode == 'train' for s in specs)
  # The benchmark validates through config_lib's tables and checks, as training does.
  for spec, message in [
      (dict(batch=3, num_devices=2), 'config.batch=3 / config.accum_steps=1 = 3 is not divisible'),
      (dict(batch=2, remat_policy='x'), "config.model.remat_policy='x'; expected one of"),
      (dict(batch=2, resolution=30), 'config.pp.resolution=30 is not a multiple of the patch'),
      (dict(batch=2, steps=0), 'steps=0'),
  ]:
    with pytest.raises(ValueError, match=re.escape(message)):
      benchmark_lib.run_config(benchmark_lib.Spec(
          **{'model': 'micro', 'resolution': 32, 'num_devices': 1, **spec}))
  with pytest.raises(app.UsageError, match='exclude each other'):
    benchmark.specs_from_flags(parse(['--preset=gpu', '--model=micro']))
  with pytest.raises(flags.IllegalFlagValueError):
    parse(['--remat=sometimes'])


def test_cpu_remat_without_scan_is_noted(tmp_path, capsys):
  row, printed = _main(tmp_path, capsys, '--mode=train', '--remat=full')
  assert ('note: remat without scan_layers' in printed) == (row['backend'] == 'cpu')


def test_command_line_entry_point(tmp_path):
  """`python -m vit_jax.benchmark` parses its absl flags, runs and records its arguments."""
  path = tmp_path / 'cli.json'
  argv = [*TINY, '--compile_only', f'--json_out={path}']
  done = subprocess.run([sys.executable, '-m', 'vit_jax.benchmark', *argv],
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'images/s n/a (compile only)' in done.stdout
  data = json.loads(path.read_text())
  assert data['argv'] == argv and data['results'][0]['compile_s'] > 0
  done = subprocess.run([sys.executable, '-m', 'vit_jax.benchmark', '--model=micro', 'extra'],
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode != 0 and 'Unexpected arguments: extra' in done.stderr
  done = subprocess.run([sys.executable, '-m', 'vit_jax.benchmark', '--model=micro',
                         '--resolution=30', '--num_devices=1'],
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
      'Error: config.pp.resolution=30 is not a multiple of the patch size 16 (x 1 ResNet '
      'stride) of micro.')


def test_paired_times_alternate_which_side_goes_first():
  from vit_jax import compare_timm  # pylint: disable=g-import-not-at-top
  calls = []
  sides = [lambda: calls.append('ours'), lambda: calls.append('timm')]
  times = compare_timm.paired_times(sides, pairs=3, steps=2)
  assert len(times) == 3 and all(t > 0 for pair in times for t in pair)
  # Each block is one warm-up + 2 timed calls; the first side alternates.
  assert calls == ['ours'] * 3 + ['timm'] * 3 + ['timm'] * 3 + ['ours'] * 3 + ['ours'] * 3 + [
      'timm'] * 3


def test_compare_timm_without_torch_is_a_usage_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(app.UsageError, match=r"pip install '\.\[compare\]'"):
    run_command(['--compare_timm', '--model=ViT-Ti_16', '--resolution=32', '--batch=2',
                 '--mode=train', '--num_devices=1'])


def _skip_without_timm():
  # Looked up, not imported: timm cannot be imported in a process that imported TensorFlow.
  if importlib.util.find_spec('timm') is None:
    pytest.skip("timm is not installed (pip install '.[compare]')")


def test_compare_timm_prints_and_writes_the_paired_ratio(tmp_path):
  # The real command in a process of its own: timm cannot be imported where TensorFlow was.
  torch = pytest.importorskip('torch')
  _skip_without_timm()
  path = tmp_path / 'out.json'
  done = subprocess.run(
      [sys.executable, '-m', 'vit_jax.benchmark', '--compare_timm', '--model=ViT-Ti_16',
       '--resolution=32', '--batch=2', '--steps=1', '--pairs=2', '--num_devices=1',
       '--mode=inference', f'--json_out={path}'],
      capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  (r,) = json.loads(path.read_text())['compare_timm']
  assert r['timm_model'] == 'vit_tiny_patch16_224' and r['threads'] >= 1
  assert r['ratios'] == pytest.approx([timm / ours for ours, timm in r['pair_times_s']])
  assert r['ratio'] == pytest.approx(sorted(r['ratios'])[0] / 2 + sorted(r['ratios'])[1] / 2)
  assert r['torch'] == torch.__version__
  assert done.stdout.count('ratio ') == 1 and 'median of 2 pairs' in done.stdout


def test_compare_timm_refuses_a_process_that_imported_tensorflow(monkeypatch):
  pytest.importorskip('torch')
  monkeypatch.delitem(sys.modules, 'timm', raising=False)
  monkeypatch.setitem(sys.modules, 'tensorflow', sys.modules.get('tensorflow', types.ModuleType(
      'tensorflow')))
  with pytest.raises(app.UsageError, match='in a process of its own'):
    run_command(['--compare_timm', '--model=ViT-Ti_16', '--resolution=32', '--batch=2',
                 '--mode=train', '--num_devices=1'])
  assert 'timm' not in sys.modules


def test_compare_timm_defaults_to_both_modes_of_the_compare_preset():
  specs = benchmark.specs_from_flags(parse(['--compare_timm']))
  assert [(s.model, s.resolution, s.batch, s.mode) for s in specs] == [
      (m, 224, 16 * jax.device_count(), mode) for m in ('ViT-Ti_16', 'ViT-S_16')
      for mode in ('train', 'inference')]


_TIMM_PARAMETERS = """
import json, sys, timm
from vit_jax import compare_timm
print(json.dumps([sum(p.numel() for p in timm.create_model(
    compare_timm.timm_name(m), pretrained=False, img_size=64, num_classes=10).parameters())
                  for m in sys.argv[1:]]))
"""


def test_timm_equivalents_have_our_parameter_counts():
  _skip_without_timm()
  names = ['ViT-Ti_16', 'ViT-S_16']
  done = subprocess.run([sys.executable, '-c', _TIMM_PARAMETERS, *names], capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  ours = [sum(x.size for x in jax.tree.leaves(
      models.abstract_params(model_configs.get_model_config(m), 10, 64))) for m in names]
  assert json.loads(done.stdout.splitlines()[-1]) == ours

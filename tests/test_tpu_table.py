"""scripts/tpu_table.py: docs/TPU.md rendered from plan results, and each cell compiled in a child
process (here a fake child: no compile)."""
import importlib.util
import json
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_FINE_TUNE = 'fine-tune 384px, batch 512'


def _script():
  spec = importlib.util.spec_from_file_location('tpu_table', _REPO / 'scripts' / 'tpu_table.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cell(topology, **fields):
  return {'model': 'ViT-Ti_16', 'recipe': _FINE_TUNE, 'topology': topology, 'batch': 512,
          'scan_layers': False, 'suggestion': None, **fields}


def test_cells_and_largest_batches_are_rendered_from_the_results(tmp_path):
  table = _script()
  table.JSON, table.DOC = str(tmp_path / 'plan.json'), str(tmp_path / 'TPU.md')
  gib = 2**30
  results = {'cells': [
      _cell('v3-8', train={'fits': True, 'total_bytes': 3 * gib, 'compile_s': 12.4},
            whole_run={'flops_per_image': 1e10, 'analytic_flops_per_image': 1e10}),
      _cell('v4-8', scan_layers=True, suggestion='--config.accum_steps=2',
            train={'fits': False, 'total_bytes': 20 * gib, 'compile_s': 30.0},
            suggested_train={'total_bytes': 10 * gib, 'compile_s': 45.2},
            whole_run={'flops_per_image': 1.3e10, 'analytic_flops_per_image': 1e10}),
      _cell('v5litepod-8', train={'fits': True, 'total_bytes': 3 * gib, 'compile_s': 9.0},
            whole_run={'flops_per_image': 0.5e10, 'analytic_flops_per_image': 1e10})],
             'max_batch': [
      {'model': 'ViT-B_16', 'resolution': 224, 'topology': 'v3-8', 'max_batch_per_device': 160,
       'smallest_failure': 168, 'largest_fitting_with_recompute': 211,
       'recompute_flops_ratio': 1.25},
      {'model': 'ViT-B_16', 'resolution': 224, 'topology': 'v4-8', 'max_batch_per_device': 115,
       'smallest_failure': 116, 'largest_fitting_with_recompute': 115,
       'recompute_flops_ratio': 1.0}]}
  pathlib.Path(table.JSON).write_text(json.dumps(results))
  table.main(['--render'])
  doc = pathlib.Path(table.DOC).read_text()
  row = next(line for line in doc.splitlines() if line.startswith(f'| ViT-Ti_16 | {_FINE_TUNE}'))
  cells = [c.strip() for c in row.strip('|').split('|')][2:]
  assert cells[0] == 'yes, 3.0 GiB; 5.12e+12 FLOP/step; 12 s'
  assert cells[1] == ('no, 20.0 GiB; `--config.accum_steps=2`: 10.0 GiB (scanned); 6.66e+12 '
                      '(1.30x the analytic count) FLOP/step; 45 s')
  assert cells[2] == ('yes, 3.0 GiB; 2.56e+12 (0.50x the analytic count: the count misses '
                      'work) FLOP/step; 9 s')
  assert cells[3:] == ['not compiled yet'] * 3
  assert f'{len(table.CELLS) - 3} of {len(table.CELLS)} cells are not compiled yet' in doc
  assert 'cells are compiled' not in doc
  batch_row = next(line for line in doc.splitlines() if line.startswith('| ViT-B_16 | 224 |'))
  assert batch_row == ('| ViT-B_16 | 224 | 160-167 (211 at 1.25x FLOPs) | 115 | '
                       'not compiled yet |')


def test_a_complete_table_says_so(tmp_path):
  table = _script()
  table.JSON, table.DOC = str(tmp_path / 'plan.json'), str(tmp_path / 'TPU.md')
  cells = [{'model': model, 'recipe': recipe, 'topology': topology, 'compiler_crash': 'SIGSEGV'}
           for model, recipe, topology in table.CELLS]
  pathlib.Path(table.JSON).write_text(json.dumps({'cells': cells, 'max_batch': []}))
  table.main(['--render'])
  doc = pathlib.Path(table.DOC).read_text()
  assert f'All {len(table.CELLS)} cells are compiled; the compiler crashed on {len(cells)}.' in doc
  assert f'fewer than {table.CRASH_ATTEMPTS} attempts ({len(cells)})' in doc
  assert 'cells are not compiled yet' not in doc
  rows = [line for line in doc.splitlines()
          if any(line.startswith(f'| {m} | {r} |') for m in table.MODELS for r in table.RECIPES)]
  crashes = [row.count('compiler crashed (SIGSEGV; 1 attempt)') for row in rows]
  assert crashes == [len(table.SLICES)] * len(table.MODELS) * len(table.RECIPES)


_FAKE_CHILD = '''
import json, os, signal, sys
model, recipe, topology = sys.argv[2:5]
with open(os.environ['CHILD_CALLS'], 'a') as f:
  f.write(f'{model} {topology}\\n')
calls = open(os.environ['CHILD_CALLS']).read().splitlines().count(f'{model} {topology}')
if topology == 'v6e-8' and (model == 'R26+ViT-S_32' or calls == 1):
  os.kill(os.getpid(), signal.SIGSEGV)  # R50+ViT-B_16 crashes only on its first attempt.
if topology == 'v4-32':
  sys.exit(3)
if topology == 'v5p-8':
  os.kill(os.getpid(), signal.SIGKILL)
print('a line the compile printed')
print(json.dumps({'model': model, 'recipe': recipe, 'topology': topology, 'train': {'fits': 1}}))
'''


def test_a_cell_whose_compiler_crashes_is_retried_then_recorded_and_the_run_goes_on(
    tmp_path, monkeypatch):
  table = _script()
  table.JSON, table.DOC = str(tmp_path / 'plan.json'), str(tmp_path / 'TPU.md')
  child = tmp_path / 'child.py'
  child.write_text(_FAKE_CHILD)
  monkeypatch.setattr(table, '__file__', str(child))
  calls = tmp_path / 'calls'
  monkeypatch.setenv('CHILD_CALLS', str(calls))
  table.CELLS = [('R26+ViT-S_32', _FINE_TUNE, 'v6e-8'), ('R50+ViT-B_16', _FINE_TUNE, 'v6e-8'),
                 ('ViT-Ti_16', _FINE_TUNE, 'v3-8')]
  crash_of_an_older_run = {'model': 'R50+ViT-B_16', 'recipe': _FINE_TUNE, 'topology': 'v6e-8',
                           'compiler_crash': 'SIGSEGV'}
  results = {'cells': [crash_of_an_older_run], 'max_batch': []}
  table.compile_cells(results)
  assert calls.read_text().splitlines() == ['R26+ViT-S_32 v6e-8'] * table.CRASH_ATTEMPTS + [
      'R50+ViT-B_16 v6e-8'] * 2 + ['ViT-Ti_16 v3-8']
  assert results['cells'] == [
      {'model': 'R50+ViT-B_16', 'recipe': _FINE_TUNE, 'topology': 'v6e-8', 'train': {'fits': 1}},
      {'model': 'R26+ViT-S_32', 'recipe': _FINE_TUNE, 'topology': 'v6e-8',
       'compiler_crash': 'SIGSEGV', 'attempts': table.CRASH_ATTEMPTS},
      {'model': 'ViT-Ti_16', 'recipe': _FINE_TUNE, 'topology': 'v3-8', 'train': {'fits': 1}}]
  assert json.loads(pathlib.Path(table.JSON).read_text()) == results
  assert table._cell(results['cells'][1]) == (
      f'compiler crashed (SIGSEGV; {table.CRASH_ATTEMPTS} attempts)')
  assert not any(table._to_compile(cell) for cell in results['cells'])
  table.compile_cells(results)  # Nothing left to compile: a crash in all attempts stays.
  assert len(calls.read_text().splitlines()) == table.CRASH_ATTEMPTS + 3
  table.CELLS = [('ViT-Ti_16', _FINE_TUNE, 'v4-32')]
  with pytest.raises(RuntimeError, match='exit 3'):
    table.compile_cells(results)
  table.CELLS = [('ViT-Ti_16', _FINE_TUNE, 'v5p-8')]  # The OOM killer's signal: not a crash.
  with pytest.raises(RuntimeError, match='exit -9'):
    table.compile_cells(results)
  assert len(results['cells']) == 3


_FAKE_PROBE = '''
import json, os, signal, sys
model, resolution, topology, per_device = sys.argv[2:6]
n = int(per_device)
with open(os.environ['PROBE_PIDS'], 'a') as f:
  f.write(f'{os.getpid()} {n}\\n')
if topology == 'v4-8':
  os.kill(os.getpid(), signal.SIGSEGV)
fits = n <= 60  # Within HBM up to 60 images; from 41 on only by recomputing (1.2x the FLOPs).
print(json.dumps({
    'arguments_bytes': 2**29, 'temporaries_bytes': n * 2**28, 'total_bytes': 2**29 + n * 2**28,
    'fits': fits, 'flops_per_device': n * 1e9 * (1.2 if n > 40 else 1.0),
    'bytes_accessed_per_device': None, 'compiler_estimate_s': None, 'compile_s': 1.0,
    'out_of_memory': None if fits else {'required_bytes': n * 2**28,
                                        'available_bytes': 60 * 2**28, 'message': 'oom'}}))
'''


def test_the_largest_batch_search_probes_each_batch_in_a_process_of_its_own(tmp_path, monkeypatch):
  table = _script()
  child = tmp_path / 'child.py'
  child.write_text(_FAKE_PROBE)
  monkeypatch.setattr(table, '__file__', str(child))
  monkeypatch.setenv('PROBE_PIDS', str(tmp_path / 'pids'))
  result = table.max_batch('ViT-B_16', 224, 'v3-8')
  probes = [line.split() for line in (tmp_path / 'pids').read_text().splitlines()]
  assert len({pid for pid, _ in probes}) == len(probes) > 3
  best, failure = result['max_batch_per_device'], result['smallest_failure']
  assert 40 - 40 * table.RELATIVE_GRANULARITY <= best <= 40 < failure
  assert failure - best <= max(1, int(table.RELATIVE_GRANULARITY * best))
  probed = sorted(int(n) for _, n in probes)
  assert probed[0] == 4
  recomputing = max(n for n in probed if n <= 60)
  assert result['largest_fitting_with_recompute'] == recomputing
  assert result['recompute_flops_ratio'] == pytest.approx(1.2 if recomputing > 40 else 1.0)
  with pytest.raises(RuntimeError, match=r'compiler crashed \(SIGSEGV\) on ViT-B_16, 224px'):
    table.max_batch('ViT-B_16', 224, 'v4-8')

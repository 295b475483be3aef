"""scripts/tpu_table.py writes docs/TPU.md from plan results (rendering only: no compile here)."""
import importlib.util
import json
import pathlib

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
            suggested_train={'total_bytes': 10 * gib},
            whole_run={'flops_per_image': 1.3e10, 'analytic_flops_per_image': 1e10})],
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
                      '(1.30x the analytic count) FLOP/step; 30 s')
  assert cells[2:] == ['not compiled yet'] * 4
  assert f'{len(table.CELLS) - 2} of {len(table.CELLS)} cells are not compiled yet' in doc
  batch_row = next(line for line in doc.splitlines() if line.startswith('| ViT-B_16 | 224 |'))
  assert batch_row == ('| ViT-B_16 | 224 | 160-167 (211 at 1.25x FLOPs) | 115 | '
                       'not compiled yet |')

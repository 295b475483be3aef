"""Every `python -m vit_jax.<command>` follows vit_jax.cli on user errors: one `Error:` line on
stderr, exit status 2, no traceback, no flag listing. One bad flag and one bad value each."""
import json
import os
import subprocess
import sys

import pytest

from tests.test_analysis import write_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, 'tests', 'fault_tolerance_config.py')


def _a_file(tmp_path) -> str:
  path = tmp_path / 'a_file'
  path.write_text('not a directory')
  return str(path)


def _edited_workdir(tmp_path, edit) -> str:
  """A finished workdir whose config.json `edit(config)` changed, as a user might by hand."""
  workdir = write_workdir(tmp_path)
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path) as f:
    config = json.load(f)
  edit(config)
  with open(config_path, 'w') as f:
    json.dump(config, f)
  return workdir


def _resolution_as_text(config):
  config['pp']['resolution'] = 'sixteen'


def _model_as_name(config):
  config['model'] = 'ViT-B_16'


# (command, arguments built from tmp_path, a piece of the expected Error line).
CASES = [
    ('main', lambda t: ['--nope=1'], 'Unknown command line flag'),
    ('main', lambda t: [f'--workdir={_a_file(t)}', f'--config={TINY_CONFIG}'],
     'is a file, not a directory'),
    ('demo', lambda t: ['--pretrain_config=/nonexistent/demo.py'],
     "No such file or directory: '/nonexistent/demo.py'"),
    ('demo', lambda t: [f'--workdir={_a_file(t)}'], 'a_file'),
    ('predict', lambda t: ['--checkpoint=x', '--images=y', '--top_k=0'], 'top_k'),
    ('predict', lambda t: [f'--checkpoint={_edited_workdir(t, _resolution_as_text)}',
                           f'--images={t}'], "pp.resolution='sixteen'"),
    ('analyze', lambda t: ['--analysis=nope', '--out_dir=x'], '--analysis'),
    ('analyze', lambda t: ['--analysis=filters', f'--out_dir={_a_file(t)}'],
     'is a file, not a directory'),
    ('report', lambda t: ['--nope=1'], 'Unknown command line flag'),
    ('report', lambda t: [f'--workdir={t}', f'--out={t}_out/report.md'], 'has no config.json'),
    ('export', lambda t: ['--checkpoint=x', '--out=y', '--platforms=gpu'], '--platforms'),
    ('export', lambda t: [f'--checkpoint={_edited_workdir(t, _model_as_name)}',
                          f'--out={t}/saved'], 'has no `model` field'),
    ('benchmark', lambda t: ['--steps=abc'], 'steps'),
    ('benchmark', lambda t: ['--model=ViT-Nope_1'], "Unknown model 'ViT-Nope_1'"),
    ('weights', lambda t: ['inspect', 'x.npz', '--bucket=nope'], 'bucket'),
    ('weights', lambda t: ['inspect', f'{t}/missing.npz'], 'missing.npz'),
    ('benchmark', lambda t: ['--pipeline_steps=abc'], 'pipeline_steps'),
    ('benchmark', lambda t: [f'--pipeline_config={TINY_CONFIG}',
                             '--pipeline_config.dataset=no_such_set'],
     "Unknown dataset 'no_such_set'"),
]


@pytest.mark.parametrize('command, make_args, message', CASES,
                         ids=[f'{c[0]}-{i % 2 and "value" or "flag"}'
                              for i, c in enumerate(CASES)])
def test_user_errors_exit_2_with_one_error_line(tmp_path, command, make_args, message):
  done = subprocess.run([sys.executable, '-m', f'vit_jax.{command}', *make_args(tmp_path)],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env={**os.environ, 'PYTHONPATH': REPO})
  errors = [line for line in done.stderr.splitlines() if line.startswith('Error:')]
  assert done.returncode == 2, done.stderr[-3000:]
  assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
  assert 'Traceback' not in done.stderr
  assert not [line for line in done.stderr.splitlines() if line.startswith('  --')]  # No help.

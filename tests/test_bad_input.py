"""Bad input, second round (issue 32): finite weights with non-finite outputs, settings the data
cannot satisfy, unusable checkpoint folders, wrong exits and messages. Command-line cases run the
real `python -m vit_jax.<command>` in a subprocess.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from tests import fault_tolerance_config
from tests import train_fixtures
from tests.test_analysis import write_workdir
from tests.test_fault_tolerance import _env as fault_tolerance_env
from tests.test_reliability import CONFIG
from tests.test_reliability import ROOT
from tests.test_reliability import _assert_user_error
from tests.test_reliability import _command
from tests.test_reliability import _env
from tests.test_reliability import _poison
from vit_jax import config_lib
from vit_jax import hardware
from vit_jax import input_pipeline
from vit_jax import output_check
from vit_jax import trainer as trainer_lib
from vit_jax import sharding
from vit_jax import state_checkpoint
from vit_jax import train_loop
from vit_jax import weights
from vit_jax import workdir as workdir_lib

# ---------------------------------------------------------------------------------------------
# Finite weights, non-finite outputs.


@pytest.fixture(scope='module')
def huge_head(tmp_path_factory) -> pathlib.Path:
  """A finished workdir whose finite head (1e38) makes every logit infinite."""
  workdir = pathlib.Path(write_workdir(tmp_path_factory.mktemp('huge_head')))
  _poison(str(workdir / 'model.npz'), 1e38, keys=['head/kernel'])
  _poison(str(workdir / 'model.npz'), 10.0, keys=['Transformer/encoder_norm/bias'])
  return workdir


HEAD_MESSAGE = (r'Checkpoint .*workdir.* computes Inf or NaN logits.* for (\d+) of \1 images, '
                r'first in the output of layer head, although its weights are finite')


def test_predict_refuses_infinite_logits_naming_the_checkpoint_and_layer(huge_head):
  result = _command('predict', f'--checkpoint={huge_head}',
                    f'--images={huge_head.parent / "images" / "class0"}')
  _assert_user_error(result, HEAD_MESSAGE)
  assert not result.stdout


def test_export_refuses_infinite_logits_before_writing(huge_head, tmp_path):
  result = _command('export', f'--checkpoint={huge_head}', f'--out={tmp_path / "saved"}',
                    '--platforms=cpu')
  _assert_user_error(result, HEAD_MESSAGE)
  assert not os.listdir(tmp_path)


def test_eval_refuses_infinite_logits(huge_head):
  images = huge_head.parent / 'images'
  result = _command('main', '--mode=eval', f'--checkpoint={huge_head}/model.npz',
                    f'--config={CONFIG}', '--config.model.transformer.num_layers=2',
                    f'--config.dataset=folder:{images}', '--config.train_split=train',
                    '--config.eval_split=test')
  _assert_user_error(result, r'Checkpoint .*model\.npz computes Inf or NaN logits on folder:.* '
                     r'test for \d+ of \d+ images, first in the output of layer head')
  assert 'eval_top1' not in result.stdout


def test_analyze_refuses_non_finite_attention_naming_the_first_layer(tmp_path):
  workdir = pathlib.Path(write_workdir(tmp_path))
  _poison(str(workdir / 'model.npz'), 1e38,
          keys=[f'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/{name}/bias'
                for name in ('query', 'key')])
  result = _command('analyze', '--analysis=attention_maps', f'--checkpoint={workdir}',
                    f'--images={tmp_path / "images" / "class0"}', f'--out_dir={tmp_path / "out"}')
  _assert_user_error(result, r'Checkpoint .* computes Inf or NaN attention maps for \d+ of \d+ '
                     r'images, first in the output of layer Transformer/encoderblock_0/'
                     r'MultiHeadDotProductAttention_1')


def test_check_finite_counts_rows_and_passes_finite_values():
  output_check.check_finite(np.ones((2, 3)), 'src')
  with pytest.raises(output_check.NonFiniteOutputError, match=r'^src computes Inf or NaN logits '
                     r'for 2 of 3 images, although'):
    output_check.check_finite(np.array([[1, np.nan], [0, 0], [np.inf, 1]]), 'src')


# ---------------------------------------------------------------------------------------------
# Settings the data cannot satisfy, checked against the data before anything compiles.


def test_fewer_classes_than_the_dataset_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  result = _command('main', f'--workdir={workdir}', f'--config={CONFIG}',
                    '--config.num_classes=5')
  _assert_user_error(result, r"config\.num_classes=5 but 'fashion_mnist' has 10 classes "
                     r'\(labels 0 to 9\)')
  assert not workdir.exists()


def _folder_config(root: pathlib.Path, classes: int, **overrides):
  for label in range(classes):
    (root / f'class{label}').mkdir(parents=True)
    for i in range(12):
      Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(root / f'class{label}' / f'{i}.png')
  return train_fixtures.tiny_config(**{'dataset': f'folder:{root}', 'num_classes': None,
                                       **overrides})


def test_a_one_class_dataset_gets_a_warning(tmp_path, caplog):
  config = _folder_config(tmp_path / 'one', 1, batch=8)
  input_pipeline.check_and_complete(config)
  assert config.num_classes == 1
  assert re.search(r"'folder:.*one' has one class only: every prediction is that class",
                   caplog.text)


def test_a_train_split_smaller_than_the_devices_is_refused(tmp_path):
  config = _folder_config(tmp_path / 'two', 2, batch=8, train_split='train[:3]')
  with pytest.raises(ValueError, match=r"config.train_split='train\[:3\]' selects 3 examples of "
                     r"'folder:.*', fewer than the 8 devices"):
    input_pipeline.check_and_complete(config)
  config = _folder_config(tmp_path / 'three', 2, num_classes=3, batch=8)
  input_pipeline.check_and_complete(config)  # More classes than the data: a warning only.
  assert config.num_classes == 3


# ---------------------------------------------------------------------------------------------
# Unusable checkpoint folders: found before anything in the workdir changes, or at the save.


def _finished_looking_workdir(root: pathlib.Path) -> pathlib.Path:
  """A workdir with the config.json this module's runs write and a metrics.jsonl."""
  root.mkdir()
  config = fault_tolerance_config.get_config()
  config.num_classes = 10
  (root / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  (root / 'metrics.jsonl').write_text(''.join(f'{{"step": {s}, "loss": 1.0}}\n'
                                              for s in range(1, 10)))
  return root


def _contents(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
          for p in sorted(root.rglob('*'))}


def _without_dac_override() -> list:
  """A command prefix under which root, too, obeys file permissions."""
  return ['setpriv', '--bounding-set=-dac_override,-dac_read_search'] if os.geteuid() == 0 else []


def _main(workdir: pathlib.Path, prefix=()) -> subprocess.CompletedProcess:
  return subprocess.run([*prefix, sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
                         f'--config={CONFIG}'], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=120)


def test_checkpoints_as_a_regular_file_is_refused_leaving_the_workdir_as_it_was(tmp_path):
  workdir = _finished_looking_workdir(tmp_path / 'run')
  (workdir / 'checkpoints').write_text('not a folder')
  before = _contents(workdir)
  result = _main(workdir)
  _assert_user_error(result, r'The checkpoints folder .*run/checkpoints is a file, not a '
                     'directory; move it away.')
  assert _contents(workdir) == before


def test_read_only_checkpoints_are_refused_before_anything_changes(tmp_path):
  workdir = _finished_looking_workdir(tmp_path / 'run')
  (workdir / 'checkpoints' / '40').mkdir(parents=True)
  os.chmod(workdir / 'checkpoints', 0o555)
  before = _contents(workdir)
  try:
    start = time.monotonic()
    result = _main(workdir, _without_dac_override())
    elapsed = time.monotonic() - start
  finally:
    os.chmod(workdir / 'checkpoints', 0o755)
  _assert_user_error(result, r'Cannot write into .*run/checkpoints \(.*ermission denied.*\): the '
                     'run saves its checkpoints there')
  assert _contents(workdir) == before
  assert elapsed < 60


def _saved_steps(checkpoints: pathlib.Path) -> list:
  try:
    return [name for name in os.listdir(checkpoints) if name.isdigit()]
  except FileNotFoundError:
    return []


def test_checkpoints_deleted_during_the_run_fail_the_next_save_naming_the_folder(tmp_path):
  workdir = tmp_path / 'run'
  checkpoints = workdir / 'checkpoints'
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', f'--config={CONFIG}',
             '--config.total_steps=100000', '--config.checkpoint_every=1']
  with open(tmp_path / 'err', 'w') as err:
    process = subprocess.Popen(command, cwd=ROOT, env=fault_tolerance_env(tmp_path / 'cache'),
                               stdout=subprocess.DEVNULL, stderr=err)
    try:
      deadline = time.monotonic() + 240
      while not _saved_steps(checkpoints):
        assert process.poll() is None, (tmp_path / 'err').read_text()[-3000:]
        assert time.monotonic() < deadline, 'no checkpoint saved in 240 s'
        time.sleep(0.05)
      # A save may be renaming a step into the folder meanwhile: delete until it is gone.
      while checkpoints.exists():
        shutil.rmtree(checkpoints, ignore_errors=True)
      deleted = time.monotonic()
      returncode = process.wait(120)
      elapsed = time.monotonic() - deleted
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
  stderr = (tmp_path / 'err').read_text()
  _assert_user_error(subprocess.CompletedProcess(command, returncode, '', stderr),
                     r'(Cannot save|Saving) the training checkpoint for step \d+')
  [error] = re.findall('^Error: .*', stderr, re.MULTILINE)
  # Deleted between two saves, or during one (orbax then recreates the folder for its save).
  assert f'{checkpoints} was deleted' in error, error
  assert '0x' not in error and ' at 0x' not in stderr, stderr[-3000:]
  assert elapsed < 60
  assert (workdir / 'metrics.jsonl').stat().st_size > 0 and (workdir / 'config.json').exists()


def test_orbax_errors_are_described_without_internal_objects():
  error = ValueError('No ArrayMetadata found for <orbax.checkpoint.ParamInfo object at '
                     '0x7f3a2c> in step\nmore lines [tensorstore_spec=\'{"a": 1}\']')
  assert (state_checkpoint.describe_error(error) ==
          'No ArrayMetadata found for an array in step')


# ---------------------------------------------------------------------------------------------
# Wrong exits and messages.


def test_a_missing_config_file_with_overrides_is_one_error_line(tmp_path):
  result = _command('main', f'--workdir={tmp_path / "run"}', '--config=configs/nope.py:b16',
                    '--config.batch=32')
  _assert_user_error(result, r"flag --config: Failed loading config file .*No such file or "
                     r"directory: 'configs/nope.py'")
  assert not (tmp_path / 'run').exists()


@pytest.fixture(scope='module')
def bad_npz(tmp_path_factory) -> dict:
  """.npz files of the 'micro' model at 16px with one array replaced: kind -> path."""
  root = tmp_path_factory.mktemp('bad_npz')
  workdir = pathlib.Path(write_workdir(root))
  with np.load(workdir / 'model.npz') as f:
    arrays = dict(f)
  paths = {}
  for kind, value in [('scalar', np.float32(1.0)), ('string', np.array(['a', 'b'])),
                      ('complex', np.ones(3, np.complex64))]:
    paths[kind] = root / f'{kind}.npz'
    np.savez(paths[kind], **{**arrays, 'embedding/kernel': value})
  return paths


BAD_ARRAY_MESSAGES = {
    'scalar': r"Checkpoint .*scalar\.npz: key 'embedding/kernel' is a scalar \(shape \(\)\)",
    'string': r"Checkpoint .*string\.npz: key 'embedding/kernel' holds <U1 values",
    'complex': r"Checkpoint .*complex\.npz: key 'embedding/kernel' holds complex64 values",
}


def test_checkpoint_inspect_names_the_file_and_key_of_a_bad_array(bad_npz):
  _assert_user_error(_command('weights', 'inspect', bad_npz['scalar']),
                     BAD_ARRAY_MESSAGES['scalar'])
  for kind in ('string', 'complex'):  # The same load as above, in this process.
    with pytest.raises(ValueError, match=BAD_ARRAY_MESSAGES[kind]):
      weights.describe(str(bad_npz[kind]))


def test_pretrained_path_names_the_key_of_a_scalar(bad_npz, tmp_path):
  # predict reads a .npz through the same checkpoint.load as inspect.
  result = _command('main', f'--workdir={tmp_path / "run"}', f'--config={CONFIG}',
                    f'--config.pretrained_path={bad_npz["scalar"]}')
  _assert_user_error(result, BAD_ARRAY_MESSAGES['scalar'])
  assert not (tmp_path / 'run').exists()


def test_a_non_finite_base_lr_is_refused_up_front(tmp_path):
  result = _command('main', f'--workdir={tmp_path / "run"}', f'--config={CONFIG}',
                    '--config.base_lr=inf')
  _assert_user_error(result, r'config\.base_lr=inf must be a finite number\.')
  assert not (tmp_path / 'run').exists()


def _float_fields(tree: dict, prefix: str = '') -> list:
  fields = []
  for key, value in tree.items():
    if isinstance(value, dict):
      fields += _float_fields(value, f'{prefix}{key}.')
    elif isinstance(value, float):
      fields.append(f'{prefix}{key}')
  return fields


def test_every_float_field_refuses_inf_and_nan():
  fields = _float_fields(train_fixtures.tiny_config().to_dict())
  assert {'base_lr', 'momentum', 'weight_decay', 'pp.area_min', 'head_bias_init'} <= set(fields)
  for field in fields:
    for value in (float('inf'), float('-inf'), float('nan')):
      config = train_fixtures.tiny_config()
      *parents, name = field.split('.')
      parent = config
      for part in parents:
        parent = parent[part]
      parent[name] = value
      with pytest.raises(ValueError, match=rf'^config\.{re.escape(field)}=-?(inf|nan) must be a '
                         'finite number'):
        config_lib.validate(config, num_devices=1, process_count=1)


def test_sigterm_during_the_final_evaluation_exits_143_and_the_same_command_finishes(tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', f'--config={CONFIG}',
             '--config.total_steps=3', '--config.warmup_steps=0', '--config.eval_split=test',
             '--config.test_split=test', '--config.batch_eval=16']
  env = fault_tolerance_env(tmp_path / 'cache')
  with open(tmp_path / 'first.err', 'w') as err:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=err)
    deadline = time.monotonic() + 240
    while not any(e['step'] == 3 for e in workdir_lib.read_metrics(str(workdir))):
      assert process.poll() is None and time.monotonic() < deadline
      time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # Now in the evaluation of 10,000 test images.
    assert process.wait(120) == 128 + signal.SIGTERM, (tmp_path / 'first.err').read_text()
  assert 'Stopped by SIGTERM after step 3' in (tmp_path / 'first.err').read_text()
  assert os.listdir(workdir / 'checkpoints') == ['3'] and not (workdir / 'model.npz').exists()
  assert not any('eval_top1' in e for e in workdir_lib.read_metrics(str(workdir)))
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / 'model.npz').exists()
  finals = [e for e in workdir_lib.read_metrics(str(workdir)) if 'eval_top1' in e]
  assert [(e['step'], sorted(e)) for e in finals] == [(3, ['eval_top1', 'step', 'test_top1'])]
  assert f'eval_top1={finals[0]["eval_top1"]:.4f}' in result.stdout


def test_eval_of_a_missing_workdir_creates_nothing(tmp_path):
  result = _command('main', '--mode=eval', f'--workdir={tmp_path / "typo"}', f'--config={CONFIG}')
  _assert_user_error(result, r'.*typo is neither a released-layout \.npz nor a training workdir')
  assert not os.listdir(tmp_path)


def test_report_on_a_binary_metrics_file_names_it(tmp_path):
  workdir = pathlib.Path(write_workdir(tmp_path))
  (workdir / 'metrics.jsonl').write_bytes(bytes(range(256)) * 4096)
  result = _command('report', f'--workdir={workdir}', f'--out={tmp_path / "out" / "report.md"}')
  _assert_user_error(result, r'.*workdir/metrics\.jsonl is not a metrics file: it holds no JSON '
                     r'event and \d+ of its lines are not UTF-8 text')
  assert not (tmp_path / 'out' / 'report.md').exists()


# ---------------------------------------------------------------------------------------------
# The memory check inside a container: the cgroup's limit.


def _fake_cgroups(monkeypatch, tmp_path, proc_lines: str, files: dict) -> None:
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / 'proc_self_cgroup').write_text(proc_lines)
  for name, text in files.items():
    (tmp_path / 'cg' / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'cg' / name).write_text(text)
  monkeypatch.setattr(hardware, 'CGROUP_ROOT', str(tmp_path / 'cg'))
  monkeypatch.setattr(hardware, 'PROC_SELF_CGROUP', str(tmp_path / 'proc_self_cgroup'))
  monkeypatch.delenv(hardware.MEMORY_LIMIT_ENV, raising=False)


GIB = 2**30


def test_memory_budget_uses_a_cgroup_v2_limit(monkeypatch, tmp_path):
  _fake_cgroups(monkeypatch, tmp_path, '0::/job\n', {
      'memory.max': 'max\n', 'job/memory.max': f'{6 * GIB}\n', 'job/memory.current': f'{GIB}\n',
      'job/memory.stat': f'anon 5\ninactive_file {GIB // 2}\n'})
  assert hardware.cgroup_memory_available() == 5.5 * GIB
  budget, source = hardware.memory_budget()
  assert budget == int(5.5 * GIB) // jax.local_device_count()
  assert source.startswith('the memory its cgroup (container) limit leaves / ')


def test_memory_budget_uses_a_cgroup_v1_limit_and_ignores_unlimited_ones(monkeypatch, tmp_path):
  _fake_cgroups(monkeypatch, tmp_path, '4:memory:/a/b\n3:cpu:/\n', {
      'memory/memory.limit_in_bytes': '9223372036854771712\n',
      'memory/memory.usage_in_bytes': f'{GIB}\n',
      'memory/a/memory.limit_in_bytes': f'{4 * GIB}\n', 'memory/a/memory.usage_in_bytes': '0\n',
      'memory/a/b/memory.limit_in_bytes': f'{8 * GIB}\n',
      'memory/a/b/memory.usage_in_bytes': f'{GIB}\n'})
  assert hardware.cgroup_memory_available() == 4 * GIB  # The parent's limit is tighter.
  _fake_cgroups(monkeypatch, tmp_path / 'none', '4:memory:/\n', {
      'memory/memory.limit_in_bytes': '9223372036854771712\n',
      'memory/memory.usage_in_bytes': f'{GIB}\n'})
  assert hardware.cgroup_memory_available() is None
  assert hardware.memory_budget()[1].startswith("the host's available memory")


# ---------------------------------------------------------------------------------------------
# A lock left by a run killed on another host.


def test_a_lock_of_another_host_names_the_flag_that_takes_it_over(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = {'host': 'other-host', 'pid': 12345, 'since': '2026-01-02T03:04:05+00:00'}
  (workdir / 'lock').write_text(json.dumps(holder))
  result = _command('main', f'--workdir={workdir}', f'--config={CONFIG}')
  _assert_user_error(result, r'.*run is in use by host other-host pid 12345 since .* rerun with '
                     r'--take_over_lock to take the workdir over')
  assert json.loads((workdir / 'lock').read_text()) == holder
  result = _command('main', f'--workdir={workdir}', f'--config={CONFIG}', '--take_over_lock',
                    '--config.total_steps=2', '--config.checkpoint_every=2',
                    env=fault_tolerance_env(tmp_path / 'cache'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'Taking over .*run/lock: it names host other-host pid 12345 since .*, as '
                   '--take_over_lock asks', result.stderr), result.stderr[-3000:]
  assert [e['step'] for e in workdir_lib.read_metrics(str(workdir)) if 'loss' in e] == [1, 2]
  assert os.listdir(workdir / 'checkpoints') == ['2']
  assert not (workdir / 'lock').exists()  # Released at the end, not left naming this run.


# ---------------------------------------------------------------------------------------------
# Resuming with another number of devices.


def test_resuming_on_another_number_of_devices_warns(tmp_path, caplog):
  config = train_fixtures.tiny_config()
  eight = trainer_lib.Trainer(config, train_fixtures.NUM_CLASSES)
  assert eight.mesh.devices.size == 8
  with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1) as ckpt:
    ckpt.save(5, eight.initial_state())
  two = trainer_lib.Trainer(config, train_fixtures.NUM_CLASSES,
                            mesh=sharding.make_mesh(jax.devices()[:2]))
  for trainer, warned in ((eight, False), (two, True)):
    caplog.clear()
    with state_checkpoint.TrainCheckpointer(str(tmp_path), save_every=1, keep=1) as ckpt:
      assert train_loop._restore_or_init(trainer, ckpt, str(tmp_path))[1] == 5  # pylint: disable=protected-access
    assert ('Resuming step 5 on 2 devices; it was saved by a run on 8.' in caplog.text) == warned

"""Bad input never gives a silent wrong answer: non-finite or integer weights in any checkpoint,
undecodable images in predict, orbax's thread tracebacks, checkpoints of another model, kill -9
during asynchronous saves, a step that does not fit in memory, messages naming what the user
wrote, `report` never writing into its inputs. Commands run as real subprocesses.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import fault_tolerance_config
from tests import train_fixtures
from tests.test_analysis import init_params
from tests.test_analysis import parse_flags
from tests.test_analysis import tiny_model_config
from tests.test_analysis import write_image_folder
from tests.test_analysis import write_workdir
from vit_jax import analyze
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import evaluate
from vit_jax import hardware
from vit_jax import inference
from vit_jax import input_pipeline
from vit_jax import report
from vit_jax import state_checkpoint
from vit_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = 'tests/fault_tolerance_config.py'


def _env(**extra) -> dict:
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
              XLA_FLAGS='--xla_force_host_platform_device_count=1', **extra)


def _command(module: str, *args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', f'vit_jax.{module}', *map(str, args)], cwd=ROOT,
                        env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _assert_user_error(result: subprocess.CompletedProcess, message: str) -> None:
  """Exit 2, one `Error: ...` line matching the regular expression `message`, no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert re.search(f'^Error: {message}', result.stderr, re.MULTILINE), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr


def _poison(npz_path: str, value: float, keys=('Transformer/encoder_norm/scale',)) -> None:
  """Rewrites `keys` of an .npz checkpoint to `value` (NaN, Inf)."""
  with np.load(npz_path) as f:
    arrays = dict(f)
  for key in keys:
    arrays[key] = np.full_like(arrays[key], value)
  np.savez(npz_path, **arrays)


# ---------------------------------------------------------------------------------------------
# Non-finite and integer weights.


@pytest.fixture(scope='module')
def nan_workdir(tmp_path_factory) -> pathlib.Path:
  """A finished workdir whose model.npz has a NaN encoder_norm/scale."""
  workdir = pathlib.Path(write_workdir(tmp_path_factory.mktemp('nan')))
  _poison(str(workdir / 'model.npz'), np.nan)
  return workdir


NAN_MESSAGE = (r'Checkpoint .*model\.npz holds NaN or Inf weights in 1 of \d+ arrays: '
               r'Transformer/encoder_norm/scale\.')


def test_nan_checkpoint_is_refused_by_eval(nan_workdir):
  images = nan_workdir.parent / 'images'
  result = _command('main', '--mode=eval', f'--checkpoint={nan_workdir}/model.npz',
                    f'--config={CONFIG}', '--config.model.transformer.num_layers=2',
                    f'--config.dataset=folder:{images}', '--config.train_split=train',
                    '--config.eval_split=test')
  _assert_user_error(result, NAN_MESSAGE)
  assert 'eval_top1' not in result.stdout


def test_nan_checkpoint_is_refused_by_predict(nan_workdir):
  result = _command('predict', f'--checkpoint={nan_workdir}',
                    f'--images={nan_workdir.parent / "images" / "class0"}')
  _assert_user_error(result, NAN_MESSAGE)
  assert not result.stdout


def test_nan_checkpoint_is_refused_by_export(nan_workdir, tmp_path):
  result = _command('export', f'--checkpoint={nan_workdir}', f'--out={tmp_path / "saved"}')
  _assert_user_error(result, NAN_MESSAGE)
  assert not os.listdir(tmp_path)


def test_check_weights_names_the_first_keys_and_counts_the_rest():
  params = {'a': {'x': np.zeros(2, np.float32)}, **{f'k{i}': np.array([np.inf], np.float32)
                                                    for i in range(5)}}
  with pytest.raises(ValueError, match=r'^src holds NaN or Inf weights in 5 of 6 arrays: k0, k1, '
                                       r'k2 and 2 more\.'):
    checkpoint.check_weights(params, 'src')
  checkpoint.check_weights({'a': {'x': jnp.ones(3, jnp.bfloat16)}}, 'src')  # No error.


def test_integer_weights_in_a_checkpoint_are_refused(tmp_path):
  npz = tmp_path / 'ints.npz'
  np.savez(npz, **{'embedding/kernel': np.ones((4, 4, 3, 16), np.int32),
                   'embedding/bias': np.zeros(16, np.float32)})
  with pytest.raises(ValueError, match=rf'^Checkpoint {npz} holds non-floating-point weights in '
                                       r'embedding/kernel \(int32, \.\.\.\); expected float'):
    checkpoint.load(str(npz))


def test_fine_tuning_from_an_all_inf_pretrained_path_is_refused(tmp_path):
  config = train_fixtures.tiny_config()
  params = init_params(tiny_model_config(), train_fixtures.NUM_CLASSES, 16)
  npz = checkpoint.save_npz(jax.tree.map(lambda p: np.full_like(p, np.inf), params),
                            str(tmp_path / 'inf.npz'))
  config.pretrained_path = npz
  trainer = train_fixtures.tiny_trainer(config)
  with pytest.raises(ValueError, match=rf'^Checkpoint {npz} holds NaN or Inf weights in (\d+) of '
                                       r'\1 arrays: '):
    trainer.initial_state()


def test_nan_training_checkpoint_is_refused_by_eval(tmp_path):
  trainer = train_fixtures.tiny_trainer(train_fixtures.tiny_config())
  state = trainer.initial_state()
  state['params']['head']['bias'] = jnp.full_like(state['params']['head']['bias'], jnp.nan)
  with state_checkpoint.TrainCheckpointer(str(tmp_path / 'checkpoints'), save_every=1,
                                          keep=1) as ckpt:
    ckpt.save(7, state)
  with pytest.raises(ValueError, match=r'^The training checkpoint of step 7 in .*/checkpoints '
                                       r'holds NaN or Inf weights in 1 of \d+ arrays: head/bias\.'):
    evaluate.checkpoint_params(trainer, str(tmp_path))


def test_eval_of_a_workdir_without_a_saved_step_names_it_and_closes_its_checkpointer(
    tmp_path, monkeypatch):
  (tmp_path / 'checkpoints').mkdir()  # Made by a run that stopped before its first save.
  closed = []
  close = state_checkpoint.TrainCheckpointer.close
  monkeypatch.setattr(state_checkpoint.TrainCheckpointer, 'close',
                      lambda self: closed.append(True) or close(self))
  trainer = train_fixtures.tiny_trainer(train_fixtures.tiny_config())
  with pytest.raises(FileNotFoundError, match=r'^No training checkpoint under .*/checkpoints\.$'):
    evaluate.checkpoint_params(trainer, str(tmp_path))
  assert closed == [True]


# ---------------------------------------------------------------------------------------------
# predict: undecodable images.


def _folder_with_undecodable_files(root: pathlib.Path, good: bool) -> pathlib.Path:
  root.mkdir(parents=True)
  if good:
    write_image_folder(root / 'good')
  (root / 'empty.png').write_bytes(b'')
  (root / 'text.png').write_text('not an image')
  (root / 'dangling.png').symlink_to(root / 'no_such_file.png')
  return root


def test_predict_skips_undecodable_files_with_a_warning_naming_each(tmp_path):
  workdir = write_workdir(tmp_path)
  images = _folder_with_undecodable_files(tmp_path / 'mixed', good=True)
  result = _command('predict', f'--checkpoint={workdir}', f'--images={images}')
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('empty.png', 'text.png', 'dangling.png'):
    assert re.search(rf'Cannot decode image file {images / name}: .* Skipping it\.',
                     result.stderr), result.stderr[-3000:]
    assert name not in result.stdout
  assert result.stdout.count(str(images / 'good')) == 36  # 3 classes x 12 images.


def test_predict_fails_when_no_image_can_be_read(tmp_path):
  workdir = write_workdir(tmp_path)
  images = _folder_with_undecodable_files(tmp_path / 'bad', good=False)
  result = _command('predict', f'--checkpoint={workdir}', f'--images={images}')
  _assert_user_error(result, rf'None of the 3 image files in {images} can be decoded; the '
                             rf'first: Cannot decode image file {images}/')


# ---------------------------------------------------------------------------------------------
# Orbax's thread tracebacks.

_DISK_FULL = '''
import resource, signal, sys
from absl import app, logging
import jax, jax.numpy as jnp, numpy as np
from vit_jax import logging_util, state_checkpoint

def main(argv):
  logging_util.quiet_libraries()
  noise = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)  # Incompressible.
  state = lambda v: {f'w{i}': jax.device_put(jnp.asarray(noise + v)) for i in range(20)}
  ckpt = state_checkpoint.TrainCheckpointer(argv[1], save_every=1, keep=3)
  ckpt.save(1, state(1.0))
  ckpt.wait()
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Files may not grow past 1 KiB: EFBIG.
  resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  try:
    ckpt.save(2, state(2.0))
    ckpt.wait()
  except state_checkpoint.CheckpointSaveError as e:
    logging.warning('%s', e)

app.run(main)
'''


def test_a_failed_save_is_one_warning_without_orbax_thread_tracebacks(tmp_path):
  result = subprocess.run([sys.executable, '-c', _DISK_FULL, str(tmp_path / 'checkpoints')],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count('Traceback') == 0, result.stderr[-3000:]
  warnings = [line for line in result.stderr.splitlines() if line.startswith(('W', 'E'))]
  assert len(warnings) == 1 and 'Saving the training checkpoint for step 2' in warnings[0], (
      result.stderr[-3000:])


# ---------------------------------------------------------------------------------------------
# Checkpoints of another model config.


def test_checkpoints_of_another_model_config_are_named_as_such_with_the_fields(tmp_path):
  config = train_fixtures.tiny_config()
  trainer = train_fixtures.tiny_trainer(config)
  with state_checkpoint.TrainCheckpointer(str(tmp_path / 'checkpoints'), save_every=1,
                                          keep=1) as ckpt:
    ckpt.save(1, trainer.initial_state())
  workdir_lib.write_config(config, str(tmp_path))
  scanned = train_fixtures.tiny_config()
  scanned.model.scan_layers = True
  with pytest.raises(ValueError) as error:
    evaluate.checkpoint_params(train_fixtures.tiny_trainer(scanned), str(tmp_path))
  message = str(error.value)
  assert message.startswith(f'The 1 training checkpoints in {tmp_path}/checkpoints belong to '
                            'another model config: their arrays differ from this run\'s state '
                            '(saved -> now):\n  ')
  # Stacked blocks (2 layers) in place of encoderblock_0 / _1; the params only, 8 lines of 48.
  assert 'opt_state' not in message
  assert re.search(r'params\.Transformer\.encoderblock\.MlpBlock_3\.Dense_0\.kernel: \(absent\) '
                   r'-> \(2, 16, 32\)', message), message
  assert '  ... and 40 more\n' in message
  assert message.endswith(f'The fields that differ from {tmp_path}/config.json (there -> now):\n'
                          '  model.scan_layers: False -> True\nUse the config they were trained '
                          'with, or another --workdir.')
  assert 'Repair' not in message


# ---------------------------------------------------------------------------------------------
# kill -9 during asynchronous saves.


def _last_logged_step(workdir: pathlib.Path) -> int:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines(keepends=True)
  return max(json.loads(line)['step'] for line in lines if line.endswith('\n'))


def test_kill9_resumes_from_the_last_save_started_half_an_interval_earlier(tmp_path):
  """Whenever the kill comes, every save started save_every // 2 steps before the last logged
  step is complete (the loop waits for it there), so at most 1.5 intervals are lost."""
  every, workdir = 10, tmp_path / 'workdir'
  with open(tmp_path / 'stderr', 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', f'--config={CONFIG}',
         f'--config.checkpoint_every={every}', '--config.keep_checkpoints=5'],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
  try:
    deadline = time.monotonic() + 300
    while not ((workdir / 'metrics.jsonl').exists() and _last_logged_step(workdir) >= 47):
      assert process.poll() is None and time.monotonic() < deadline, (
          (tmp_path / 'stderr').read_text()[-3000:])
      time.sleep(0.01)
  finally:
    process.kill()
    process.wait()
  logged = _last_logged_step(workdir)
  complete = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert logged < fault_tolerance_config.TOTAL_STEPS
  assert max(complete) >= (logged - every // 2) // every * every, (logged, complete)


# ---------------------------------------------------------------------------------------------
# Out of memory.


def test_a_step_that_does_not_fit_fails_before_the_first_step_with_the_numbers(tmp_path):
  result = _command('main', f'--workdir={tmp_path / "workdir"}', f'--config={CONFIG}',
                    env=_env(**{hardware.MEMORY_LIMIT_ENV: '0.0001'}))
  _assert_user_error(
      result, r'Out of memory: The train step needs \d+\.\d MiB per device \(XLA\'s memory '
              r'analysis: arguments [\d.]+ MiB, temporaries [\d.]+ MiB\) of 0\.1 MiB '
              r'\(\$VIT_JAX_MEMORY_LIMIT_GB\)\. To need less: raise config\.accum_steps \(now 1;')
  assert "config.sharding='fsdp' (now 'replicate')" in result.stderr
  assert not (tmp_path / 'workdir' / 'metrics.jsonl').exists()


def test_memory_budget_is_the_override_else_the_host_s_available_memory(monkeypatch):
  monkeypatch.setenv(hardware.MEMORY_LIMIT_ENV, '2.5')
  assert hardware.memory_budget() == (int(2.5 * 2**30), '$VIT_JAX_MEMORY_LIMIT_GB')
  monkeypatch.delenv(hardware.MEMORY_LIMIT_ENV)
  budget, source = hardware.memory_budget()
  with open('/proc/meminfo') as f:
    available = next(int(l.split()[1]) * 1024 for l in f if l.startswith('MemAvailable:'))
  assert abs(budget * jax.local_device_count() - available) < 2**30
  assert source == f'the host\'s available memory / {jax.local_device_count()} CPU devices'


# ---------------------------------------------------------------------------------------------
# Messages naming what the user wrote.


@pytest.mark.parametrize('field, value, bound', [('checkpoint_every', -1, '>= 0'),
                                                 ('keep_checkpoints', 0, '>= 1')])
def test_checkpoint_fields_out_of_range_are_named_as_written(field, value, bound):
  config = fault_tolerance_config.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=rf'^config\.{field}={value} must be {bound}\.$'):
    config_lib.validate(config, num_devices=1, process_count=1)


def test_an_empty_train_split_is_named():
  config = fault_tolerance_config.get_config()
  config.train_split = 'train[:0]'
  with pytest.raises(ValueError, match=re.escape(
      "config.train_split='train[:0]' selects no examples of 'fashion_mnist'.")):
    input_pipeline.get_dataset_info(config)


def test_a_truncated_config_json_is_named(tmp_path):
  workdir = pathlib.Path(write_workdir(tmp_path))
  text = (workdir / 'config.json').read_text()
  (workdir / 'config.json').write_text(text[:len(text) // 2])
  with pytest.raises(ValueError, match=rf'^{workdir}/config\.json is not valid JSON \('):
    inference.load_model(str(workdir))


@pytest.mark.parametrize('define_flags,argv', [
    (analyze.define_flags, ['--analysis=filters', '--out_dir=o', '--num_images=0']),
    (report.define_flags, ['--workdir=w', '--out=o.md', '--num_images=-1']),
])
def test_non_positive_num_images_is_a_flag_error(define_flags, argv):
  with pytest.raises(flags.IllegalFlagValueError, match='num_images'):
    parse_flags(define_flags, argv)


@pytest.mark.parametrize('values', [['8', '0'], ['-1'], ['x']])
def test_non_positive_batch_sizes_are_an_error(values):
  with pytest.raises(ValueError, match=rf'^--batch_sizes takes positive integers; got '
                                       rf'{",".join(values)}\.$'):
    analyze._ints(values, 'batch_sizes')  # pylint: disable=protected-access


def test_zero_pipeline_steps_is_a_flag_error():
  result = _command('benchmark', f'--pipeline_config={CONFIG}', '--pipeline_steps=0', timeout=120)
  assert result.returncode != 0
  assert re.search(r'--pipeline_steps=0: 0 is not a positive integer', result.stderr), (
      result.stderr[-2000:])
  assert 'images/s' not in result.stdout


# ---------------------------------------------------------------------------------------------
# report never writes into the workdirs it reads.


def _tree(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob('*')}


@pytest.mark.parametrize('out,message', [
    ('{parent}/report.md', r"the figures of run 'workdir' would be written to {parent}/workdir, "
                           r'into the workdir {workdir} that the report reads'),
    ('{workdir}/report.md', r'--out={workdir}/report\.md would be written to {workdir}/report\.md'),
], ids=['figures_into_the_workdir', 'report_into_the_workdir'])
def test_report_refuses_outputs_in_its_inputs_before_writing_anything(tmp_path, out, message):
  workdir = pathlib.Path(write_workdir(tmp_path, metrics=[{'step': 1, 'loss': 1.0}]))
  before = _tree(tmp_path)
  paths = dict(parent=tmp_path, workdir=workdir)
  with pytest.raises(ValueError, match=f'^{message.format(**paths)}'):
    report.write_report(parse_flags(report.define_flags, [
        f'--workdir={workdir}', f'--out={out.format(**paths)}', '--analyses=filters']))
  assert _tree(tmp_path) == before


def test_report_with_a_directory_as_out_fails_before_writing_anything(tmp_path):
  workdir = pathlib.Path(write_workdir(tmp_path, metrics=[{'step': 1, 'loss': 1.0}]))
  before = _tree(tmp_path)
  result = _command('report', f'--workdir={workdir}', f'--out={tmp_path}', '--analyses=filters')
  _assert_user_error(result, rf'--out={tmp_path} is a directory; pass the Markdown file to '
                             rf'write, e\.g\. --out={tmp_path}/report\.md\.')
  assert _tree(tmp_path) == before


def test_truncated_array_data_falls_back_to_the_previous_checkpoint(tmp_path):
  """orbax wraps tensorstore's read error of a truncated array file in a bare Exception."""
  directory = tmp_path / 'checkpoints'
  state = lambda value: {'w': jax.device_put(jnp.full((64, 64), value))}
  with state_checkpoint.TrainCheckpointer(str(directory), save_every=1, keep=2) as ckpt:
    ckpt.save(1, state(1.0))
    ckpt.save(2, state(2.0))
  data = [p for p in (directory / '2' / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert data
  for path in data:
    os.truncate(path, 10)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state(0.0))
  with state_checkpoint.TrainCheckpointer(str(directory), save_every=1, keep=2) as ckpt:
    restored, step = ckpt.restore(abstract, set_aside_unrestorable=True)
  assert step == 1
  np.testing.assert_array_equal(restored['w'], np.full((64, 64), 1.0))
  assert (directory / '2.unrestorable').is_dir()

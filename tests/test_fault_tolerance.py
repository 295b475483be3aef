"""Fault tolerance for real: SIGTERM and kill -9 sent to `python -m vit_jax.main` runs whose
resumed loss curves must equal an uninterrupted run's; non-finite steps; workdir reuse; bad input
answered with `Error: ...` and exit code 2.

The command-line runs (tests/fault_tolerance_config.py, one CPU device each) are made by the
module fixture `cli` in two rounds of parallel processes sharing a compilation cache; the other
tests call the CLI's `main` in this process (8 CPU devices) or the training loop directly.
"""
import json
import os
import re
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags
import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tests import fault_tolerance_config
from tests import train_fixtures
from vit_jax import cli as cli_lib
from vit_jax import input_pipeline
from vit_jax import main
from vit_jax import sharding
from vit_jax import train_loop
from vit_jax import state_checkpoint
from vit_jax import trainer as trainer_lib
from vit_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = 'tests/fault_tolerance_config.py'
TOTAL_STEPS = fault_tolerance_config.TOTAL_STEPS
CHECKPOINT_EVERY = fault_tolerance_config.CHECKPOINT_EVERY
TIMEOUT_S = 400


# ---------------------------------------------------------------------------------------------
# Command-line runs in subprocesses.


def _events(workdir: pathlib.Path) -> list:
  """The complete events of WORKDIR/metrics.jsonl (a line being written is left out)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  events = []
  for line in path.read_text().splitlines(keepends=True):
    if line.endswith('\n'):
      events.append(json.loads(line))
  return events


def _losses(workdir: pathlib.Path) -> list:
  return [(e['step'], e['loss']) for e in _events(workdir) if 'loss' in e]


def _checkpoint_steps(workdir: pathlib.Path) -> list:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


class _Cli:
  """A running `python -m vit_jax.main --config=tests/fault_tolerance_config.py ...`."""

  def __init__(self, tmp: pathlib.Path, name: str, workdir: str, *args: str, env: dict):
    self.name, self.workdir = name, tmp / workdir
    self._out, self._err = tmp / f'{name}.out', tmp / f'{name}.err'
    with open(self._out, 'w') as out, open(self._err, 'w') as err:
      self.process = subprocess.Popen(
          [sys.executable, '-m', 'vit_jax.main', f'--workdir={self.workdir}',
           f'--config={CONFIG}', *args], cwd=ROOT, env=env, stdout=out, stderr=err)

  @property
  def stdout(self) -> str:
    return self._out.read_text()

  @property
  def stderr(self) -> str:
    return self._err.read_text()

  def wait_for_step(self, step: int) -> None:
    """Returns once metrics.jsonl shows `step` (or a later one)."""
    _signal_when({self.name: (lambda: _last_step(self.workdir) >= step, lambda: None)},
                 {self.name: self})

  def finish(self) -> int:
    try:
      return self.process.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.process.kill()
      pytest.fail(f'{self.name} did not finish in {TIMEOUT_S} s:\n{self.stderr[-3000:]}')


def _last_step(workdir: pathlib.Path) -> int:
  events = _events(workdir)
  return events[-1]['step'] if events else 0


def _has_checkpoint(workdir: pathlib.Path, step: int) -> bool:
  """Whether the checkpoint of `step`, or a later one, is complete."""
  folder = workdir / 'checkpoints'
  return folder.is_dir() and any(s >= step for s in _checkpoint_steps(workdir))


def _signal_when(actions: dict, runs: dict) -> None:
  """Polls every run named in `actions` = {name: (condition, action)} and calls a run's action
  once its condition holds; fails if a run exits first or TIMEOUT_S passes."""
  deadline, pending = time.monotonic() + TIMEOUT_S, dict(actions)
  while pending:
    for name, (condition, action) in list(pending.items()):
      if condition():
        action()
        del pending[name]
      elif runs[name].process.poll() is not None:
        pytest.fail(f'{name} exited ({runs[name].process.returncode}) before its signal:\n'
                    f'{runs[name].stderr[-3000:]}')
    if time.monotonic() > deadline:
      pytest.fail(f'{sorted(pending)} did not reach their signal in {TIMEOUT_S} s.')
    time.sleep(0.005)


def _env(cache_dir: pathlib.Path) -> dict:
  return dict(
      os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
      # One device and cheap compiles; every run shares one compilation cache.
      XLA_FLAGS='--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 '
                '--xla_llvm_disable_expensive_passes=true',
      JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')


def _folder_with_a_non_image(root: pathlib.Path) -> pathlib.Path:
  """10 classes of two 16x16 PNGs (as many classes as Fashion-MNIST) and a text file `.png`."""
  rng = np.random.default_rng(0)
  for label in range(10):
    (root / f'class_{label}').mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
          root / f'class_{label}' / f'{i}.png')
  (root / 'class_3' / 'notes.png').write_text('not an image')
  return root


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
  """The command-line runs of this module, in two rounds; returns them by name.

  Round 1: a run stopped with SIGTERM at step 3 or later, and one killed with SIGKILL after its
  first periodic checkpoint. Round 2 (finding round 1's executables in the compilation cache):
  both resumed by the same command, and an uninterrupted run.
  """
  tmp = tmp_path_factory.mktemp('cli')
  env = _env(tmp / 'jax_cache')
  runs = {name: _Cli(tmp, name, workdir, env=env)
          for name, workdir in [('sigterm', 'interrupted'), ('kill9', 'killed')]}
  # Both runs are watched in one loop: a run is fast once compiled (about 10 ms a step here), so
  # waiting for one while the other goes unwatched let the other finish before its signal.
  _signal_when({
      'sigterm': (lambda: _last_step(runs['sigterm'].workdir) >= 3,
                  lambda: runs['sigterm'].process.send_signal(signal.SIGTERM)),
      'kill9': (lambda: _has_checkpoint(runs['kill9'].workdir, CHECKPOINT_EVERY)
                and _last_step(runs['kill9'].workdir) >= CHECKPOINT_EVERY + 2,
                runs['kill9'].process.kill)}, runs)
  for run in runs.values():
    run.finish()
    run.events, run.checkpoints = _events(run.workdir), _checkpoint_steps(run.workdir)
  round2 = [_Cli(tmp, 'sigterm_resumed', 'interrupted', env=env),
            _Cli(tmp, 'kill9_resumed', 'killed', env=env),
            _Cli(tmp, 'reference', 'reference', env=env)]
  for run in round2:
    run.finish()
    run.events = _events(run.workdir)
    runs[run.name] = run
  # Round 3: the finished reference run with its latest checkpoint truncated on disk, resumed.
  shutil.copytree(runs['reference'].workdir, tmp / 'corrupted')
  runs['corrupted'] = _truncate_latest_checkpoint(tmp / 'corrupted')
  run = _Cli(tmp, 'corrupted_resumed', 'corrupted', env=env)
  run.finish()
  runs[run.name] = run
  return runs


def _truncate_latest_checkpoint(workdir: pathlib.Path) -> int:
  """Cuts every file of the newest checkpoint to half its size; returns that step."""
  step = _checkpoint_steps(workdir)[-1]
  for path in (workdir / 'checkpoints' / str(step)).rglob('*'):
    if path.is_file():
      os.truncate(path, path.stat().st_size // 2)
  return step


def test_uninterrupted_reference_run_finishes(cli):
  run = cli['reference']
  assert run.process.returncode == 0, run.stderr[-3000:]
  assert [step for step, _ in _losses(run.workdir)] == list(range(1, TOTAL_STEPS + 1))
  assert run.stdout.startswith('eval_top1=')


def test_sigterm_finishes_the_step_saves_it_and_exits_143(cli):
  run = cli['sigterm']
  assert run.process.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
  assert 'Received SIGTERM: stopping after the current step' in run.stderr
  last_logged = run.events[-1]['step']
  assert 3 <= last_logged < TOTAL_STEPS
  assert run.checkpoints == [last_logged]
  assert (f'Stopped by SIGTERM after step {last_logged}, saved to {run.workdir}/checkpoints. '
          'Run the same command to resume.') in run.stderr


def test_run_resumed_after_sigterm_follows_the_uninterrupted_curve(cli):
  stopped_at = cli['sigterm'].checkpoints[-1]
  run = cli['sigterm_resumed']
  assert run.process.returncode == 0, run.stderr[-3000:]
  assert f'Resumed from {run.workdir} at step {stopped_at}.' in run.stderr
  assert _losses(run.workdir) == _losses(cli['reference'].workdir)


def test_kill9_loses_only_the_steps_since_the_last_checkpoint(cli):
  killed = cli['kill9']
  assert killed.process.returncode == -signal.SIGKILL
  logged = [e['step'] for e in killed.events if 'loss' in e]
  last_checkpoint = killed.checkpoints[-1]
  assert CHECKPOINT_EVERY <= last_checkpoint <= logged[-1] < TOTAL_STEPS
  run = cli['kill9_resumed']
  assert run.process.returncode == 0, run.stderr[-3000:]
  assert f'Resumed from {run.workdir} at step {last_checkpoint}.' in run.stderr
  # The events of the lost steps were dropped, then written again: one curve, the reference's.
  assert _losses(run.workdir) == _losses(cli['reference'].workdir)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(cli):
  truncated = cli['corrupted']
  run = cli['corrupted_resumed']
  assert run.process.returncode == 0, run.stderr[-3000:]
  checkpoints = run.workdir / 'checkpoints'
  assert (f'The training checkpoint for step {truncated} in {checkpoints} cannot be restored, '
          'trying the previous one.') in run.stderr
  assert 'Traceback' not in run.stderr  # orbax's thread tracebacks included.
  previous = truncated - truncated % CHECKPOINT_EVERY  # keep_checkpoints=2: the periodic one.
  assert f'Resumed from {run.workdir} at step {previous}.' in run.stderr
  # Set aside for inspection, then written again by the resumed run, which followed the curve.
  assert (checkpoints / f'{truncated}.unrestorable').is_dir()
  assert _checkpoint_steps(run.workdir)[-1] == truncated
  assert _losses(run.workdir) == _losses(cli['reference'].workdir)


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI's main, in this process.


@pytest.fixture
def run_main(monkeypatch, capsys):
  """Calls the CLI as `python -m vit_jax.main ARGS` would; returns (exit code, stdout, stderr)."""

  def run(*args):
    argv = ['vit_jax.main', *args]
    monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads --config.x overrides there.
    try:
      cli_lib.guarded(main.main)(cli_lib.parse_flags(argv))
      code = 0
    except SystemExit as e:
      code = e.code
    _reset_flags()
    out = capsys.readouterr()
    return code, out.out, out.err

  yield run
  _reset_flags()


def _reset_flags():
  """Unparses the flags and drops the `--config.x` override flags that parsing defined."""
  flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):
    if name.startswith('config.'):
      delattr(flags.FLAGS, name)


@pytest.mark.parametrize('args,message', [  # message: a regular expression.
    (['--config=configs/vit.py:foo,cifar10'],
     re.escape('flag --config=configs/vit.py:foo,cifar10: Error whilst parsing config file: '
               "ValueError: Unknown model 'foo'. Known models: ViT-Ti_16")),
    ([f'--config={CONFIG}', '--config.dataset=foo'],
     re.escape("Unknown dataset 'foo': neither a TFDS name nor folder:/path/to/images.")),
    ([f'--config={CONFIG}', '--config.pp.resolution=18'],
     re.escape('config.pp.resolution=18 is not a multiple of the patch size 4')),
    ([f'--config={CONFIG}', '--config.batch=12'],
     re.escape('config.batch=12 / config.accum_steps=1 = 12 is not divisible by the 8 devices.')),
    ([f'--config={CONFIG}', '--config.pp.eval=squash'],  # Once failed only at the first eval.
     re.escape("config.pp.eval='squash'; expected one of ('resize', 'central_crop').")),
    ([f'--config={CONFIG}', '--config.model.posemb=learned'],
     re.escape("config.model.posemb='learned'; expected one of ('learn', 'none', 'learn2d', "
               "'sincos2d').")),
    ([f'--config={CONFIG}', '--config.model.attention_impl=pallas'],
     re.escape("config.model.attention_impl='pallas' (Pallas' TPU flash attention) runs on TPUs "
               "only, not on the cpu backend")),
    ([f'--config={CONFIG}', '--config.batchh=16'],
     re.escape("""Unknown config field 'batchh'. Did you mean "batch" instead of "batchh"?""")),
    ([f'--config={CONFIG}', '--config.dataset=folder:/no/such/folder'],
     re.escape('Image folder /no/such/folder does not exist.')),
    ([f'--config={CONFIG}', '--mode=eval', '--checkpoint=/no/such/model.npz'],
     re.escape('Checkpoint /no/such/model.npz does not exist.')),
], ids=['model', 'dataset', 'resolution', 'batch', 'pp_eval', 'posemb', 'pallas', 'field',
        'folder', 'checkpoint'])
def test_bad_input_gets_error_message_and_exit_code_2(run_main, tmp_path, args, message):
  start = time.monotonic()
  code, _, stderr = run_main(f'--workdir={tmp_path / "workdir"}', *args)
  assert code == 2, stderr
  assert re.search(f'^Error: {message}', stderr, re.MULTILINE), stderr
  assert 'Traceback' not in stderr
  assert time.monotonic() - start < 60  # Before anything compiles.
  assert not (tmp_path / 'workdir').exists()


def test_gcs_path_without_network_fails_fast(run_main, tmp_path):
  try:
    socket.getaddrinfo('storage.googleapis.com', 443)
    pytest.skip('needs a machine without network')
  except socket.gaierror:
    pass
  start = time.monotonic()
  code, _, stderr = run_main(f'--workdir={tmp_path / "workdir"}', f'--config={CONFIG}',
                          '--config.pretrained_path=gs://no-such-bucket-vit-jax/ViT.npz')
  assert code == 2, stderr
  assert re.search(r'^Error: Cannot reach gs://no-such-bucket-vit-jax/ViT.npz: .*Could not '
                   'resolve host', stderr, re.MULTILINE), stderr
  assert time.monotonic() - start < 30
  assert not (tmp_path / 'workdir').exists()


def test_reusing_a_workdir_with_another_model_is_refused(cli, run_main):
  workdir = cli['reference'].workdir
  code, _, stderr = run_main(f'--workdir={workdir}', f'--config={CONFIG}',
                             '--config.model.hidden_size=32', '--config.log_every=10')
  assert code == 2, stderr
  assert stderr.startswith(f'Error: {workdir} holds a run with another config (field: in '
                           'config.json -> now):\n  model.hidden_size: 16 -> 32\nUse another '
                           '--workdir, or --config.allow_config_change=True to resume')
  assert _events(workdir) == cli['reference'].events
  assert json.loads((workdir / 'config.json').read_text())['model']['hidden_size'] == 16


def test_non_image_file_in_an_image_folder_is_skipped_with_a_warning(cli, run_main, tmp_path,
                                                                    caplog):
  images = _folder_with_a_non_image(tmp_path / 'images')
  code, stdout, stderr = run_main(
      f'--config={CONFIG}', '--mode=eval', f'--checkpoint={cli["reference"].workdir}/model.npz',
      f'--config.dataset=folder:{images}', '--config.train_split=train',
      '--config.eval_split=test', '--config.test_split=test')
  assert code == 0, stderr
  assert (f'Skipping 1 undecodable image file(s) in {images}: '
          f'{os.path.join("class_3", "notes.png")}') in caplog.text
  assert stdout.startswith('eval_top1=')


def test_pickled_npz_as_pretrained_path_is_refused(run_main, tmp_path):
  npz = tmp_path / 'pickled.npz'
  np.savez(npz, **{'embedding/kernel': np.array([{'code': 'os.system'}], dtype=object)})
  code, _, stderr = run_main(f'--workdir={tmp_path / "workdir"}', f'--config={CONFIG}',
                             f'--config.pretrained_path={npz}')
  assert code == 2, stderr
  assert stderr.startswith(f"Error: Checkpoint {npz}: key 'embedding/kernel' holds a pickled "
                           'object array, which is refused')
  assert not (tmp_path / 'workdir').exists()  # A failed start leaves nothing on disk.


def test_remote_path_that_does_not_answer_fails_fast(monkeypatch):
  release = threading.Event()
  monkeypatch.setattr(tf.io.gfile, 'exists', lambda path: release.wait())  # A dead network.
  start = time.monotonic()
  with pytest.raises(OSError, match=r'gs://bucket/ViT.npz did not answer within 0.5 s'):
    main.check_remote_path('gs://bucket/ViT.npz', timeout_s=0.5)
  assert time.monotonic() - start < 5
  release.set()


def test_first_signal_requests_a_stop_and_a_second_one_interrupts():
  # Python's own handler, whatever the shell left (a background job starts with SIGINT ignored).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with train_loop._StopSignals() as stop:  # pylint: disable=protected-access
      assert not stop.requested(1)
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.requested(2) and stop.signum == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  finally:
    signal.signal(signal.SIGINT, outer)


# ---------------------------------------------------------------------------------------------
# Workdir reuse.


def test_workdir_config_check_ignores_resumable_fields_and_lists_the_others(tmp_path, caplog):
  saved = json.loads(train_fixtures.tiny_config(dataset='fashion_mnist').to_json_best_effort())
  del saved['pp']['resize']  # As if written before base_config had it: it has its default.
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  workdir_lib.check_config(
      train_fixtures.tiny_config(dataset='fashion_mnist', log_every=7, checkpoint_every=9,
                                 accum_steps=2, sharding='fsdp', nonfinite='skip'), str(tmp_path))
  other = train_fixtures.tiny_config(dataset='cifar10', total_steps=50)
  other.model.hidden_size = 32
  other.pp.resolution = 32
  other.pp.resize = 40
  other.num_classes = 100
  with pytest.raises(ValueError) as error:
    workdir_lib.check_config(other, str(tmp_path))
  changes = str(error.value).split('\n')[1:-1]
  assert changes == ["  dataset: 'fashion_mnist' -> 'cifar10'", '  model.hidden_size: 16 -> 32',
                     '  num_classes: 10 -> 100', '  pp.resize: None -> 40',
                     '  pp.resolution: 16 -> 32', '  total_steps: 100 -> 50']
  other.allow_config_change = True
  workdir_lib.check_config(other, str(tmp_path))
  assert 'Resuming' in caplog.text and 'model.hidden_size: 16 -> 32' in caplog.text


# ---------------------------------------------------------------------------------------------
# Non-finite steps, in the training loop itself (8 CPU devices).

NAN_STEP = 7


@pytest.fixture(scope='module')
def trainer():
  config = train_fixtures.tiny_config(
      dataset='fashion_mnist', train_split='train[:256]', eval_split='test[:32]',
      shuffle_buffer=256, total_steps=10, log_every=5, eval_every=10, checkpoint_every=4,
      keep_checkpoints=5, progress=False)
  config.model.transformer.num_layers = 1
  # One device: quicker to compile, and what is tested does not depend on the device count.
  return trainer_lib.Trainer(config, train_fixtures.NUM_CLASSES,
                             mesh=sharding.make_mesh(jax.devices()[:1]))


@pytest.fixture
def nan_batch_at_step_7(monkeypatch):
  """Makes the images of the 7th batch of the training stream NaN."""
  build = input_pipeline.build_train_iterator

  def poisoned(config, *, start_step=0, **kwargs):
    for step, batch in enumerate(build(config, start_step=start_step, **kwargs), start_step + 1):
      yield dict(batch, image=np.full_like(batch['image'], np.nan)) if step == NAN_STEP else batch

  monkeypatch.setattr(input_pipeline, 'build_train_iterator', poisoned)


def _run(trainer, workdir: pathlib.Path) -> train_loop.Run:
  ckpt = state_checkpoint.TrainCheckpointer(
      str(workdir / 'checkpoints'), save_every=trainer.config.checkpoint_every,
      keep=trainer.config.keep_checkpoints)
  batches = train_loop._batches(trainer.config, trainer, 0)  # pylint: disable=protected-access
  return train_loop.Run(trainer, ckpt, str(workdir), trainer.initial_state(), 0, batches,
                        workdir_lib.Lock(str(workdir), None), lambda: None)


def _restored_params(trainer, workdir: pathlib.Path, step: int):
  with state_checkpoint.TrainCheckpointer(str(workdir / 'checkpoints'), save_every=1,
                                          keep=1) as ckpt:
    state, _ = ckpt.restore(trainer.abstract_state, step=step)
  return jax.device_get(state['params'])


def _all_finite(tree) -> bool:
  return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree))


def test_nonfinite_step_is_not_applied_on_device(trainer):
  batch = next(input_pipeline.build_train_iterator(trainer.config))
  batch = jax.device_put(dict(batch, image=np.full_like(batch['image'], np.nan)),
                         sharding.batch_sharding(trainer.mesh))
  state = trainer.initial_state()
  before = jax.device_get(state)
  after, metrics = trainer.train_step(state, batch)
  after = jax.device_get(after)
  assert not metrics['is_finite'] and np.isnan(metrics['loss'])
  assert int(after['step']) == 1
  jax.tree.map(np.testing.assert_array_equal, after['params'], before['params'])
  jax.tree.map(np.testing.assert_array_equal, after['opt_state'], before['opt_state'])


def test_nonfinite_stop_raises_naming_the_step_before_saving_it(trainer, nan_batch_at_step_7,
                                                               tmp_path):
  # Steps 4 and 8 save, 5 and 10 log: step 7 must be caught by the check before the save at 8.
  with pytest.raises(train_loop.NonFiniteError,
                     match=rf'at step {NAN_STEP} .*the checkpoint of step 4 .* is kept'):
    _run(trainer, tmp_path).train()
  assert _checkpoint_steps(tmp_path) == [4]
  assert _all_finite(_restored_params(trainer, tmp_path, 4))
  assert not (tmp_path / 'model.npz').exists()


def test_nonfinite_skip_drops_the_step_and_goes_on(trainer, nan_batch_at_step_7, tmp_path,
                                                   monkeypatch, caplog):
  monkeypatch.setattr(trainer.config, 'nonfinite', 'skip')
  _run(trainer, tmp_path).train()
  assert f"(config.nonfinite='skip'): [{NAN_STEP}]" in caplog.text
  assert _checkpoint_steps(tmp_path) == [4, 8, 10]
  assert _all_finite(_restored_params(trainer, tmp_path, 10))
  assert [e['step'] for e in _events(tmp_path) if 'loss' in e] == [5, 10]
  assert (tmp_path / 'model.npz').exists()

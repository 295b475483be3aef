"""Multi-host training through the command users type, on 127.0.0.1.

Two `python -m vit_jax.main --coordinator_address=... --num_processes=2 --process_id=I`
processes with 4 CPU devices each (gloo collectives) train on Fashion-MNIST through the real
input pipeline (the whole train split, a shuffle buffer far smaller than it), each reading the
shards of its own devices, with FSDP (parameters and optimizer
state split across the hosts) and gradient accumulation. Stopped with SIGTERM to both and
resumed by the same commands, they must follow the loss curve and reach the eval accuracy and
final weights of one process with 8 devices, writing one metrics.jsonl and one model.npz.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from flax import traverse_util
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / 'tests' / 'fault_tolerance_config.py'
TOTAL_STEPS = 20
# The whole train split (60,000 images) with a buffer of 8 per device's shard: far smaller than a
# shard, so each process's shuffle must not depend on how many shards it reads.
FLAGS = [f'--config={CONFIG}', f'--config.total_steps={TOTAL_STEPS}', '--config.batch=64',
         '--config.train_split=train', '--config.shuffle_buffer=64',
         '--config.accum_steps=2', '--config.sharding=fsdp', f'--config.eval_every={TOTAL_STEPS}',
         f'--config.checkpoint_every={TOTAL_STEPS}']
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, cache_dir: pathlib.Path) -> dict:
  return dict(
      os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true',
      JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')


def _start(workdir: pathlib.Path, logs: pathlib.Path, env: dict, *extra: str):
  logs.parent.mkdir(parents=True, exist_ok=True)
  with open(f'{logs}.out', 'w') as out, open(f'{logs}.err', 'w') as err:
    return subprocess.Popen([sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
                             *FLAGS, *extra], cwd=ROOT, env=env, stdout=out, stderr=err)


def _two_processes(workdir: pathlib.Path, logs: pathlib.Path, env: dict) -> list:
  port = _free_port()
  return [_start(workdir, logs / str(i), env, f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}') for i in range(2)]


def _finish(processes: list, logs: pathlib.Path) -> list:
  codes = []
  for i, process in enumerate(processes):
    try:
      codes.append(process.wait(TIMEOUT_S))
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      pytest.fail(f'process {i} did not finish in {TIMEOUT_S} s')
  return codes


def _stderr(logs: pathlib.Path) -> str:
  return '\n'.join(p.read_text()[-2000:] for p in sorted(logs.glob('*.err')))


def _wait_for_step(workdir: pathlib.Path, step: int, processes: list) -> None:
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline:
    try:
      if any(e['step'] >= step for e in workdir_lib.read_metrics(str(workdir))):
        return
    except ValueError:  # A line being written.
      pass
    assert all(p.poll() is None for p in processes), 'a process exited early'
    time.sleep(0.05)
  pytest.fail(f'no step {step} in {TIMEOUT_S} s')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(one process with 8 devices, two processes with 4 stopped by SIGTERM and resumed)."""
  tmp = tmp_path_factory.mktemp('multihost')
  single = _start(tmp / 'single', tmp / 'logs' / 'single', _env(8, tmp / 'cache8'))
  assert _finish([single], tmp / 'logs') == [0], _stderr(tmp / 'logs')
  env = _env(4, tmp / 'cache4')
  first = _two_processes(tmp / 'multi', tmp / 'logs' / 'first', env)
  _wait_for_step(tmp / 'multi', 3, first)
  for process in first:
    process.send_signal(signal.SIGTERM)
  first_codes = _finish(first, tmp / 'logs' / 'first')
  stopped_at = max(e['step'] for e in workdir_lib.read_metrics(str(tmp / 'multi')))
  resumed = _two_processes(tmp / 'multi', tmp / 'logs' / 'resumed', env)
  resumed_codes = _finish(resumed, tmp / 'logs' / 'resumed')
  assert resumed_codes == [0, 0], _stderr(tmp / 'logs' / 'resumed')
  return tmp, first_codes, stopped_at


def _events(workdir: pathlib.Path):
  events = workdir_lib.read_metrics(str(workdir))
  losses = [(e['step'], e['loss']) for e in events if 'loss' in e]
  return losses, [e['eval_top1'] for e in events if 'eval_top1' in e]


def test_sigterm_to_both_processes_stops_them_at_the_same_saved_step(runs):
  tmp, first_codes, stopped_at = runs
  assert first_codes == [128 + signal.SIGTERM] * 2, _stderr(tmp / 'logs' / 'first')
  assert 3 <= stopped_at < TOTAL_STEPS
  for i in range(2):
    assert f'after step {stopped_at}' in (tmp / 'logs' / 'first' / f'{i}.err').read_text()
  assert 'JAX backend cpu: 8 x cpu (4 on this process), 2 process(es).' in (
      tmp / 'logs' / 'first' / '0.err').read_text()


def test_two_processes_follow_the_curve_of_one_process_with_eight_devices(runs):
  tmp, _, _ = runs
  single_losses, single_eval = _events(tmp / 'single')
  multi_losses, multi_eval = _events(tmp / 'multi')
  # One event per step: the resumed run rewound nothing twice and process 1 wrote nothing.
  assert [s for s, _ in multi_losses] == list(range(1, TOTAL_STEPS + 1))
  assert [s for s, _ in single_losses] == [s for s, _ in multi_losses]
  np.testing.assert_allclose([l for _, l in multi_losses], [l for _, l in single_losses],
                             rtol=1e-5)
  assert len(multi_eval) == 1 and multi_eval == pytest.approx(single_eval, abs=1e-6)
  assert sorted(os.listdir(tmp / 'multi')) == sorted(os.listdir(tmp / 'single'))


def test_two_processes_write_the_weights_of_one_process(runs):
  tmp, _, _ = runs
  single = traverse_util.flatten_dict(checkpoint.load(str(tmp / 'single' / 'model.npz')), sep='/')
  multi = traverse_util.flatten_dict(checkpoint.load(str(tmp / 'multi' / 'model.npz')), sep='/')
  assert single.keys() == multi.keys()
  for key, value in single.items():
    # The attention's key bias shifts every logit of a query alike, which softmax ignores: its
    # gradient is zero up to rounding, and Adam turns that rounding into steps of any sign.
    if not key.endswith('key/bias'):
      np.testing.assert_allclose(multi[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

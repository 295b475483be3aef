"""vit_jax.workdir: config.json, metrics.jsonl rewinding, the lock, and every command reading a
workdir that is not on the local disk (tf.io.gfile's in-memory `ram://` filesystem).

ram:// lives inside one process, so these tests call the commands in-process through their
flag parsing; the subprocess tests (tests/test_commands.py, tests/test_workdir_runs.py) use
local paths, which take the same tf.io.gfile code path. Training itself cannot run on ram://:
its orbax checkpoints go through tensorstore, which has no ram:// driver (gs:// it has).
"""
import json
import os
import socket
import subprocess
import sys
import tracemalloc
import uuid

import numpy as np
import pytest
import tensorflow as tf

from tests import fault_tolerance_config
from tests import train_fixtures
from tests.test_analysis import init_params
from tests.test_analysis import parse_flags
from tests.test_analysis import write_workdir
from vit_jax import analyze
from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import export
from vit_jax import main  # Defines its flags, as tests/test_fault_tolerance.py does.
from vit_jax import predict
from vit_jax import report
from vit_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=['local', 'ram'])
def root(request, tmp_path) -> str:
  """An empty folder: under tmp_path, or in tf.io.gfile's in-memory filesystem."""
  if request.param == 'local':
    yield str(tmp_path)
    return
  path = f'ram://{uuid.uuid4().hex}'
  tf.io.gfile.makedirs(path)
  yield path
  tf.io.gfile.rmtree(path)


def _write(path: str, text: str) -> None:
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(text)


def _read(path: str) -> str:
  with tf.io.gfile.GFile(path) as f:
    return f.read()


# ---------------------------------------------------------------------------------------------
# config.json and metrics.jsonl


def test_config_round_trip_and_check(root):
  workdir = f'{root}/run'
  config = train_fixtures.tiny_config(dataset='fashion_mnist')
  workdir_lib.check_config(config, workdir)  # No config.json yet: nothing to compare.
  tf.io.gfile.makedirs(workdir)
  workdir_lib.write_config(config, workdir)
  assert workdir_lib.read_config(workdir) == json.loads(config.to_json_best_effort())
  workdir_lib.check_config(train_fixtures.tiny_config(dataset='fashion_mnist', log_every=3),
                           workdir)
  with pytest.raises(ValueError, match=r"holds a run with another config .*\n  total_steps: "
                                       r'100 -> 7\n'):
    workdir_lib.check_config(train_fixtures.tiny_config(dataset='fashion_mnist', total_steps=7),
                             workdir)
  _write(f'{workdir}/config.json', '{"model": ')
  with pytest.raises(ValueError, match=f'{workdir}/config.json is not valid JSON .* Delete it'):
    workdir_lib.check_config(config, workdir)


METRICS = ['{"step": 1, "loss": 2.0}\n', 'a line broken by hand\n', '{"step": 2, "loss": 1.5}\n',
           '{"step": 3, "loss": 1.2}\n', '{"step": 4, "loss": 1.0}\n', '{"step": 5, "lo']


def test_rewind_keeps_broken_lines_before_the_step_and_drops_the_rest(root, caplog):
  path = f'{root}/metrics.jsonl'
  _write(path, ''.join(METRICS))
  workdir_lib.rewind_metrics(root, 3)
  assert _read(path) == ''.join(METRICS[:4])
  assert (f'{path}: 1 line(s) are not JSON events with a step; kept as they are: line 2.'
          in caplog.text)
  workdir_lib.rewind_metrics(root, 10)  # Nothing after step 10: unchanged.
  assert _read(path) == ''.join(METRICS[:4])


def test_rewind_to_step_0_empties_the_file(root):
  path = f'{root}/metrics.jsonl'
  _write(path, ''.join(METRICS[2:4]))
  workdir_lib.rewind_metrics(root, 0)
  assert _read(path) == ''


def test_rewind_drops_a_last_line_cut_short(root):
  path = f'{root}/metrics.jsonl'
  _write(path, METRICS[0] + METRICS[-1])
  workdir_lib.rewind_metrics(root, 5)
  assert _read(path) == METRICS[0]


def test_read_metrics_names_the_lines_it_skips(root, caplog):
  _write(f'{root}/metrics.jsonl', ''.join(METRICS))
  assert [e['step'] for e in workdir_lib.read_metrics(root)] == [1, 2, 3, 4]
  assert (f'{root}/metrics.jsonl: 2 line(s) are not JSON events with a step; skipped: line 2, '
          '6.' in caplog.text)


def test_read_metrics_of_millions_of_bad_lines_warns_once_in_bounded_memory(root, caplog):
  garbage = b'not json\n' * 100_000 + b'x' * (3 << 20)  # And a 3 MiB line without a newline.
  with tf.io.gfile.GFile(f'{root}/metrics.jsonl', 'wb') as f:
    f.write(b'{"step": 1, "loss": 2.0}\n' + garbage + b'\n{"step": 2, "loss": 1.0}\n')
  tracemalloc.start()
  try:
    events = workdir_lib.read_metrics(root)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert [e['step'] for e in events] == [1, 2]
  assert peak < 8 << 20
  warnings = [r for r in caplog.records if 'metrics.jsonl' in r.getMessage()]
  assert len(warnings) == 1
  assert ('100001 line(s) are not JSON events with a step; skipped: line 2, 3, 4, 5, 6, ...'
          in warnings[0].getMessage())


def test_read_metrics_of_a_binary_file_names_it(root):
  with tf.io.gfile.GFile(f'{root}/metrics.jsonl', 'wb') as f:
    f.write(bytes(range(256)) * 1000)
  with pytest.raises(ValueError, match=f'^{root}/metrics.jsonl is not a metrics file: it holds no '
                     r'JSON event and \d+ of its lines are not UTF-8 text'):
    workdir_lib.read_metrics(root)


# ---------------------------------------------------------------------------------------------
# The lock.


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def _lock_naming(workdir: str, host: str, pid: int) -> dict:
  holder = {'host': host, 'pid': pid, 'since': '2026-01-02T03:04:05+00:00'}
  tf.io.gfile.makedirs(workdir)
  _write(f'{workdir}/lock', json.dumps(holder))
  return holder


def test_lock_is_held_then_released(root):
  workdir = f'{root}/run'
  held = workdir_lib.lock(workdir)
  holder = json.loads(_read(f'{workdir}/lock'))
  assert holder == held.holder and holder['pid'] == os.getpid()
  assert holder['host'] == socket.gethostname()
  held.release()
  assert tf.io.gfile.listdir(workdir) == []


@pytest.mark.parametrize('host', ['this', 'other'])
def test_lock_of_a_live_process_or_another_host_is_refused(root, host):
  workdir = f'{root}/run'
  hostname = socket.gethostname() if host == 'this' else 'other-host'
  pid = os.getppid() if host == 'this' else _dead_pid()  # Another host's pids are not ours.
  _lock_naming(workdir, hostname, pid)
  with pytest.raises(workdir_lib.WorkdirInUse) as error:
    workdir_lib.lock(workdir)
  assert str(error.value) == (f'{workdir} is in use by host {hostname} pid {pid} since '
                              '2026-01-02T03:04:05+00:00 (if that run is gone, e.g. killed on '
                              'its host, rerun with --take_over_lock to take the workdir over).')
  assert isinstance(error.value, cli.UserError)


def test_lock_of_a_dead_process_on_this_host_is_taken_over(root, caplog):
  workdir = f'{root}/run'
  pid = _dead_pid()
  _lock_naming(workdir, socket.gethostname(), pid)
  held = workdir_lib.lock(workdir)
  assert json.loads(_read(f'{workdir}/lock'))['pid'] == os.getpid()
  assert f'Taking over {workdir}/lock: it names host {socket.gethostname()} pid {pid}' in (
      caplog.text)
  held.release()


def test_failed_start_removes_the_workdir_it_created_only(root):
  created = workdir_lib.lock(f'{root}/new')
  created.release(failed_start=True)
  assert not tf.io.gfile.exists(f'{root}/new')
  tf.io.gfile.makedirs(f'{root}/old')
  _write(f'{root}/old/metrics.jsonl', METRICS[0])
  workdir_lib.lock(f'{root}/old').release(failed_start=True)
  assert tf.io.gfile.listdir(f'{root}/old') == ['metrics.jsonl']


def test_a_workdir_that_is_a_file_is_refused(root):
  _write(f'{root}/file', 'x')
  with pytest.raises(FileExistsError, match=f'--workdir={root}/file is a file, not a directory'):
    workdir_lib.lock(f'{root}/file')


# ---------------------------------------------------------------------------------------------
# Every command on a ram:// workdir.


@pytest.fixture(scope='module')
def ram_workdir(tmp_path_factory):
  """tests.test_analysis.write_workdir's finished workdir, copied to ram://; and its images."""
  tmp = tmp_path_factory.mktemp('ram')
  local = write_workdir(tmp, metrics=[{'step': 1, 'loss': 2.0}, {'step': 2, 'eval_top1': 0.5}])
  remote = f'ram://{uuid.uuid4().hex}/workdir'
  tf.io.gfile.makedirs(remote)
  for name in os.listdir(local):
    tf.io.gfile.copy(os.path.join(local, name), f'{remote}/{name}')
  yield remote, str(tmp / 'images')
  tf.io.gfile.rmtree(os.path.dirname(remote))


def test_predict_reads_a_ram_workdir(ram_workdir):
  workdir, images = ram_workdir
  out = predict.run(parse_flags(predict.define_flags, [f'--checkpoint={workdir}',
                                                       f'--images={images}', '--top_k=1']))
  assert out.count('  0.3333  ') == len(os.listdir(f'{images}/class0')) * 3  # Uniform head.


def test_analyze_reads_a_ram_workdir(ram_workdir, tmp_path):
  workdir, _ = ram_workdir
  summary = analyze.run(parse_flags(analyze.define_flags, [
      '--analysis=posemb_similarity', f'--checkpoint={workdir}', f'--out_dir={tmp_path}']))
  assert summary['png'] == f'{tmp_path}/posemb_similarity.png'


def test_report_reads_a_ram_workdir(ram_workdir, tmp_path):
  workdir, _ = ram_workdir
  out = report.write_report(parse_flags(report.define_flags, [
      f'--workdir={workdir}', f'--out={tmp_path}/report.md', '--analyses=posemb_similarity']))
  text = open(out).read()
  assert f'Workdir `{workdir}`' in text and '| 50.00% | 50.00% |' in text


def test_export_reads_a_ram_workdir(ram_workdir, tmp_path):
  workdir, _ = ram_workdir
  export.run(parse_flags(export.define_flags, [f'--checkpoint={workdir}',
                                               f'--out={tmp_path}/saved', '--platforms=cpu']))
  assert tf.saved_model.load(f'{tmp_path}/saved').signatures['serving_default']


def test_main_evaluates_a_ram_checkpoint(tmp_path, capsys):
  """`main --mode=eval` of a .npz on ram:// prints what it prints for the same file on disk (a
  workdir's orbax state cannot live on ram://)."""
  config = fault_tolerance_config.get_config()
  params = init_params(config.model, 10, 16, head_bias=np.eye(10)[3])
  printed = []
  for path in (str(tmp_path / 'model.npz'), f'ram://{uuid.uuid4().hex}/model.npz'):
    checkpoint.save_npz(params, path)
    main.main(cli.parse_flags(['main', '--mode=eval', f'--checkpoint={path}',
                               f'--config={ROOT}/tests/fault_tolerance_config.py']))
    printed.append(capsys.readouterr().out)
  assert printed[0].startswith('eval_top1=') and printed[1] == printed[0]


# ---------------------------------------------------------------------------------------------
# Several processes.


def _lock_in_two_processes(workdir: str) -> list[str]:
  """What tests/multihost_workdir_worker.py reports in processes 0 and 1."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  worker = os.path.join(ROOT, 'tests', 'multihost_workdir_worker.py')
  results = [f'{workdir}.process{i}' for i in range(2)]
  processes = [subprocess.Popen([sys.executable, worker, '2', str(i), str(port), workdir,
                                 results[i]],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  reports = []
  for path in results:
    with open(path) as f:
      reports.append(f.read())
  return reports


def test_several_processes_hold_the_workdir_once_by_process_0(tmp_path):
  first, second = _lock_in_two_processes(str(tmp_path / 'free'))
  assert first.startswith('HELD {"host": ') and second == 'HELD null'
  held = _lock_naming(str(tmp_path / 'held'), socket.gethostname(), os.getpid())
  first, second = _lock_in_two_processes(str(tmp_path / 'held'))
  assert first == (f'REFUSED {tmp_path}/held is in use by host {held["host"]} pid '
                   f'{os.getpid()} since {held["since"]} (if that run is gone, e.g. killed on '
                   'its host, rerun with --take_over_lock to take the workdir over).')
  assert second == f'REFUSED Process 0 could not hold {tmp_path}/held: see its error.'

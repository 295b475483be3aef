"""Command line: train (fine-tune or pre-train) or evaluate.

    python -m vit_jax.main --workdir=/tmp/b16_cifar10 --config=configs/vit.py:b16,cifar10
    python -m vit_jax.main --mode=eval --checkpoint=checkpoints/ViT-B_16.npz --config=...

Any config field can be overridden, e.g. `--config.batch=4096 --config.accum_steps=8`. Training
resumes from WORKDIR: rerun the same command after a crash, `kill -9` or preemption. Exit codes:
those of every command (vit_jax.cli; 2 also for a workdir held by another run, see
--take_over_lock), and 3 when training stopped on a non-finite loss (config.nonfinite='stop').
"""
import os
import threading

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from vit_jax import cli
from vit_jax import evaluate
from vit_jax import hardware
from vit_jax import logging_util
from vit_jax import train_loop

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/vit.py:b16,cifar10.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the run writes (vit_jax.workdir); local '
                                'or gs://.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming from WORKDIR); eval: print eval_top1 '
                          '(config.eval_split) and test_top1 (config.test_split).')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'For --mode=eval: a released-layout .npz or a workdir (default: '
    '--workdir).')
_TAKE_OVER_LOCK = flags.DEFINE_bool(
    'take_over_lock', False, 'Train even though WORKDIR/lock names a run of another host: for a '
    'shared workdir (NFS, gs://) whose run was killed there (kill -9, a lost VM). Safe only when '
    'that run is gone: two runs in one workdir overwrite each other\'s checkpoints.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')

EXIT_NONFINITE = 3
# A remote path (gs://...) that does not answer within this time is reported as unreachable.
REMOTE_TIMEOUT_S = 60.0


def initialize_distributed() -> None:
  """Joins the other hosts; on Cloud TPU all three flags may stay unset (auto-detected)."""
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    # Nothing may ask for the backend before this (jax.default_backend() would initialise it);
    # CPU processes talk through gloo, JAX's default CPU collectives.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CLOUD_TPU_TASK_ID'):
    jax.distributed.initialize()


def check_remote_path(path: str, timeout_s: float = REMOTE_TIMEOUT_S) -> None:
  """Raises OSError when a remote (`scheme://`) path errs or does not answer within timeout_s.

  Without a network, tf's GCS client retries for minutes; this fails fast instead.
  """
  if '://' not in path:
    return
  errors = []

  def probe():
    try:
      tf.io.gfile.exists(path)
    except tf.errors.OpError as e:
      errors.append(e)

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise OSError(f'{path} did not answer within {timeout_s:g} s: is there a network (and '
                  'credentials for it)?')
  if errors:
    raise OSError(f'Cannot reach {path}: {errors[0].message}') from errors[0]


def check_remote_paths(config, path: str) -> None:
  """Fails on an unreachable remote path (`path`, or one of the config's) before anything reads it
  (the config and dataset are checked by train_loop.prepare / evaluate.run)."""
  for location in (path, config.pretrained_path, config.pretrained_dir, config.data_dir):
    if location:
      check_remote_path(location)


def _train(config, workdir: str) -> dict:
  """Trains; a signal ends it with 128 + N and a non-finite loss with EXIT_NONFINITE (cli)."""
  check_remote_paths(config, workdir)
  run = train_loop.prepare(config, workdir, take_over_lock=_TAKE_OVER_LOCK.value)
  try:
    return run.train()
  except train_loop.NonFiniteError as e:
    cli.fail(e, EXIT_NONFINITE)


def main(argv):
  cli.check_no_arguments(argv)
  logging_util.quiet_libraries()
  if _CONFIG.value is None:
    raise cli.UserError('--config is required, e.g. --config=configs/vit.py:b16,cifar10.')
  initialize_distributed()
  logging.info('%s', hardware.backend_summary())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value.unlock()
  if _MODE.value == 'train':
    if not _WORKDIR.value:
      raise cli.UserError('--workdir is required for --mode=train.')
    metrics = _train(config, _WORKDIR.value)
  else:
    path = _CHECKPOINT.value or _WORKDIR.value
    if not path:
      raise cli.UserError('--mode=eval needs --checkpoint or --workdir.')
    check_remote_paths(config, path)
    metrics = evaluate.run(config, path)
  if jax.process_index() == 0:
    print(' '.join(f'{k}={v:.4f}' for k, v in metrics.items()), flush=True)


if __name__ == '__main__':
  cli.run(main)

"""Command line: train (fine-tune or pre-train) or evaluate.

    python -m vit_jax.main --workdir=/tmp/b16_cifar10 --config=configs/vit.py:b16,cifar10
    python -m vit_jax.main --mode=eval --workdir=/tmp/b16_cifar10 --config=configs/vit.py:b16,cifar10
    python -m vit_jax.main --mode=eval --checkpoint=checkpoints/ViT-B_16.npz --config=...

Any config field can be overridden, e.g. `--config.batch=4096 --config.accum_steps=8`.

Training resumes from WORKDIR: rerun the same command after a crash, `kill -9` or preemption.

Exit codes:
  0      done.
  1      an unexpected error (a bug): Python's traceback.
  2      `Error: <message>` on stderr: a bad flag, config, dataset, path or checkpoint, a workdir
         holding a run with another config, a training checkpoint that could not be saved (disk
         full). Only errors raised while setting up a training run (before its first step) are
         reported this way, besides that last one; in --mode=eval the whole evaluation counts
         as setting up. Add --verbosity=1 to log their traceback too.
  3      training stopped on a non-finite loss or gradient (config.nonfinite='stop').
  128+N  stopped by signal N (143: SIGTERM, 130: SIGINT) after saving a checkpoint of the last
         finished step; the same command resumes.
"""
import os
import sys
import threading

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from vit_jax import cli
from vit_jax import config_lib
from vit_jax import evaluate
from vit_jax import hardware
from vit_jax import input_pipeline
from vit_jax import logging_util
from vit_jax import train
from vit_jax import train_checkpoint

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/vit.py:b16,cifar10.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and model.npz go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming from WORKDIR); eval: print top-1.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'For --mode=eval: a released-layout .npz or a workdir (default: '
    '--workdir).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')

EXIT_NONFINITE = 3
# Errors that setting up a run raises for what the user must fix (gs:// failures are tf's).
USER_ERRORS = (cli.UserError, ValueError, OSError, tf.errors.OpError)
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


def check_config(config, paths) -> None:
  """Fails on an unknown dataset, an impossible config or an unreachable remote path before
  anything compiles."""
  config_lib.validate(config, num_devices=jax.device_count(),
                      process_count=jax.process_count())
  for path in (*paths, config.pretrained_path, config.pretrained_dir, config.data_dir):
    if path:
      check_remote_path(path)
  input_pipeline.get_dataset_info(config)


def _train(config, workdir: str) -> dict:
  try:
    check_config(config, [workdir])
    run = train.prepare(config, workdir)
  except USER_ERRORS as e:
    cli.fail(e)
  try:
    return run.train()
  except train.TrainingInterrupted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except train.NonFiniteError as e:
    cli.fail(e, EXIT_NONFINITE)
  except train_checkpoint.CheckpointSaveError as e:
    cli.fail(e)


def _evaluate(config, path: str) -> dict:
  try:
    check_config(config, [path])
    return {'eval_top1': evaluate.run(config, path)}
  except USER_ERRORS as e:
    cli.fail(e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging_util.quiet_libraries()
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/vit.py:b16,cifar10.')
  initialize_distributed()
  logging.info('%s', hardware.backend_summary())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value.unlock()
  if _MODE.value == 'train':
    if not _WORKDIR.value:
      raise app.UsageError('--workdir is required for --mode=train.')
    metrics = _train(config, _WORKDIR.value)
  else:
    path = _CHECKPOINT.value or _WORKDIR.value
    if not path:
      raise app.UsageError('--mode=eval needs --checkpoint or --workdir.')
    metrics = _evaluate(config, path)
  if jax.process_index() == 0:
    print(' '.join(f'{k}={v:.4f}' for k, v in metrics.items()), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

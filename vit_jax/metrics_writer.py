"""Metrics out: JSON lines in WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes; the others get a writer that does nothing, so callers need no checks.
`vit_jax.workdir.read_metrics` reads them back.
"""
import json
from typing import Mapping

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from vit_jax import workdir as workdir_lib


class MetricsWriter:

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._path = workdir_lib.path(workdir, workdir_lib.METRICS)
    self._summary = None
    if self.enabled:
      tf.io.gfile.makedirs(workdir)
      self._summary = tf.summary.create_file_writer(
          workdir_lib.path(workdir, workdir_lib.TENSORBOARD))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with tf.io.gfile.GFile(self._path, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    with self._summary.as_default(step=int(step)):
      for name, value in scalars.items():
        tf.summary.scalar(name, value)
    self._summary.flush()
    logging.info('step %d: %s', step, ', '.join(f'{k}={v:.5g}' for k, v in scalars.items()))


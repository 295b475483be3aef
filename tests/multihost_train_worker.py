"""Runs a few train steps on fixed synthetic global batches; prints the losses as JSON.

    python tests/multihost_train_worker.py NUM_PROCESSES PROCESS_ID PORT SHARDING

Every process builds the same global batches and feeds only its own rows, so one process with 8
devices and two processes with 4 devices each must produce the same loss curve.
"""
import json
import sys

import jax
import numpy as np


def main(num_processes, process_id, port, strategy):
  if num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                               num_processes=num_processes, process_id=process_id)
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures  # pylint: disable=g-import-not-at-top
  config = train_fixtures.tiny_config(sharding=strategy, accum_steps=2)
  trainer = train_fixtures.tiny_trainer(config)
  state = trainer.initial_state()
  rows = config.batch // jax.process_count()
  start = jax.process_index() * rows
  losses = []
  for batch in train_fixtures.synthetic_batches(config, steps=4):
    local = {k: v[start:start + rows] for k, v in batch.items()}
    global_batch = {k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(trainer.mesh), v) for k, v in local.items()}
    state, metrics = trainer.train_step(state, global_batch)
    losses.append(float(metrics['loss']))
  if jax.process_index() == 0:
    print('LOSSES ' + json.dumps(losses), flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

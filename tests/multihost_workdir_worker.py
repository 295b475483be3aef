"""Takes the workdir lock as one of several processes; prints what this process holds.

    python tests/multihost_workdir_worker.py NUM_PROCESSES PROCESS_ID PORT WORKDIR

Prints `HELD <holder as JSON>` (null on the processes that hold nothing) or `REFUSED <error>`.
"""
import json
import sys

import jax


def main(num_processes: int, process_id: int, port: str, workdir: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=num_processes, process_id=process_id)
  from vit_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    lock = workdir_lib.lock(workdir)
  except workdir_lib.WorkdirInUse as e:
    print(f'REFUSED {e}', flush=True)
    return
  print(f'HELD {json.dumps(lock.holder)}', flush=True)
  lock.release()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

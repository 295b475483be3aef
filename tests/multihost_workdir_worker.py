"""Takes the workdir lock as one of several processes; writes what this process holds.

    python tests/multihost_workdir_worker.py NUM_PROCESSES PROCESS_ID PORT WORKDIR RESULT_FILE

Writes `HELD <holder as JSON>` (null on the processes that hold nothing) or `REFUSED <error>` to
RESULT_FILE (not stdout: gloo's C++ threads write to stdout too, and their lines can land in the
middle of ours).
"""
import json
import sys

import jax


def main(num_processes: int, process_id: int, port: str, workdir: str,
         result_file: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=num_processes, process_id=process_id)
  from vit_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    lock = workdir_lib.lock(workdir)
  except workdir_lib.WorkdirInUse as e:
    result = f'REFUSED {e}'
  else:
    result = f'HELD {json.dumps(lock.holder)}'
    lock.release()
  with open(result_file, 'w') as f:
    f.write(result)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])

"""Restart-to-first-step with and without the persistent compilation cache (docs/PERFORMANCE.md).

    python scripts/restart_time.py ['CONFIG [--config.FIELD=VALUE ...]' ...]
        (default: configs/demo.py:pretrain)

For each config, three fresh processes each start a training run the way `python -m vit_jax.main`
does (`train_loop.prepare`: checks, compile, restore or init, input pipeline) and run its first
step, in a new workdir: cache off, cache cold (empty: compiles and fills it), cache warm (the
second start: loads). Prints the seconds from process start to the first step's end.
"""
import shlex
import subprocess
import sys
import tempfile
import time

_CHILD = '''
import sys, jax
from ml_collections import config_flags
from absl import flags
from vit_jax import train_loop
config_flags.DEFINE_config_file('config', None)
flags.FLAGS(['x', '--config=' + sys.argv[1]] + sys.argv[3:])
config = flags.FLAGS.config.unlock()
config.progress = False
run = train_loop.prepare(config, sys.argv[2])
state, metrics = run.trainer.train_step(run.state, next(run.batches))
jax.block_until_ready(metrics)
run.ckpt.close(); run.lock.release()
'''


def start(config: str, workdir: str, cache_dir: str) -> float:
  config, *overrides = shlex.split(config)
  begin = time.perf_counter()
  subprocess.run([sys.executable, '-c', _CHILD, config, workdir, *overrides,
                  f'--config.compilation_cache_dir={cache_dir}'], check=True,
                 capture_output=True)
  return time.perf_counter() - begin


def main(configs):
  for config in configs or ['configs/demo.py:pretrain']:
    with tempfile.TemporaryDirectory() as tmp:
      off = start(config, f'{tmp}/off', '')
      cold = start(config, f'{tmp}/cold', f'{tmp}/cache')
      warm = start(config, f'{tmp}/warm', f'{tmp}/cache')
    print(f'{config}: start to first step {off:.1f} s without the cache, {cold:.1f} s with an '
          f'empty cache, {warm:.1f} s with the cache filled by the previous start', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])

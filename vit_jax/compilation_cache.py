"""JAX's persistent compilation cache for training runs: a restart loads the compiled train and
eval steps instead of compiling them again (docs/PERFORMANCE.md).

Its default home is the workdir (WORKDIR/compilation_cache): a preempted Cloud TPU slice comes
back as new VMs with empty disks, while every restart reads the workdir.
`config.compilation_cache_dir` names another directory (e.g. one shared by a sweep), or '' turns
it off. JAX keys each entry by the program, the compiler and its flags: none is ever stale.
"""
from typing import Callable, Optional

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache

from vit_jax import workdir as workdir_lib


def directory(config, workdir: str) -> Optional[str]:
  """Where the run's compiled programs are cached, or None (off)."""
  if config.compilation_cache_dir is None:
    return workdir_lib.path(workdir, workdir_lib.COMPILATION_CACHE)
  return config.compilation_cache_dir or None


def enable(config, workdir: str) -> Callable[[], None]:
  """Points JAX's persistent cache at `directory(config, workdir)` (or turns it off) before the
  run compiles anything. Returns what puts the process's previous setting back at the run's end:
  JAX's setting is process-wide, and a later compile in the same process (the next run, a
  notebook) must not write into this workdir, which may be gone by then."""
  previous = jax.config.jax_compilation_cache_dir
  path = directory(config, workdir)
  _point_at(path)
  if path:
    logging.info('Compiled programs are cached in %s.', path)
  return lambda: _point_at(previous)


def _point_at(path: Optional[str]) -> None:
  compilation_cache.reset_cache()  # JAX reads the setting once per process, at first use.
  jax.config.update('jax_compilation_cache_dir', path)

"""The project's default XLA:CPU flags, set before JAX starts a backend.

A module of its own, importing no JAX: `vit_jax/__init__.py` calls `set_cpu_xla_flags` on import,
and `import vit_jax` must stay light.
"""
import os

# XLA:CPU flags set by default (docs/PERFORMANCE.md, "YNNPACK's dots"). XLA hands dots and
# reductions to YNNPACK by default; its dots ran at 0.6x the speed of XLA's own on an Intel host
# and no faster on an AMD one, so only reductions (and the dots they fuse) go there: train step
# 1.07-1.16x, inference 1.17-1.24x on both. They change nothing on other backends. A flag already
# in XLA_FLAGS keeps the user's value.
CPU_XLA_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': 'reduce'}
# Set to 1 to leave XLA_FLAGS as it is (XLA's own defaults; the same-function test uses it).
NO_CPU_FLAGS_ENV = 'VIT_JAX_NO_CPU_FLAGS'


def set_cpu_xla_flags(environ=os.environ) -> str:
  """Adds `CPU_XLA_FLAGS` to `environ['XLA_FLAGS']` (except flags named there already, or all
  with VIT_JAX_NO_CPU_FLAGS=1) and returns the result.

  XLA parses XLA_FLAGS once, when JAX starts its first backend; `vit_jax/__init__.py` calls this
  on import, so every command (and a notebook importing vit_jax before running JAX) gets them.
  """
  current = environ.get('XLA_FLAGS', '')
  if environ.get(NO_CPU_FLAGS_ENV, '') == '1':
    return current
  named = {flag.lstrip('-').split('=')[0] for flag in current.split()}
  extra = [f'--{k}={v}' for k, v in CPU_XLA_FLAGS.items() if k not in named]
  if extra:
    environ['XLA_FLAGS'] = ' '.join([current, *extra]).strip()
  return environ.get('XLA_FLAGS', '')

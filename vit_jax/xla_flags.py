"""The project's default XLA:CPU flags, set before JAX starts a backend.

A module of its own, importing no JAX: `vit_jax/__init__.py` calls `set_cpu_xla_flags` on import,
and `import vit_jax` must stay light.
"""
import os

# XLA:CPU flags set by default (docs/PERFORMANCE.md, "XLA:CPU flags"): dots and their fused
# neighbours go to XNNPACK's kernels instead of XLA's own, which closes most of the gap to timm.
# They change nothing on other backends. A flag already in XLA_FLAGS keeps the user's value.
CPU_XLA_FLAGS = {'xla_cpu_use_xnnpack': 'true'}
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

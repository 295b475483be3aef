"""The host environment of XLA:CPU: the project's default XLA flags, set before JAX starts a
backend, and the check of the host allocator's setting.

Imports no JAX at module level: `vit_jax/__init__.py` calls `set_cpu_xla_flags` on import, and
`import vit_jax` must stay light.
"""
import os
import sys

from absl import logging

# XLA:CPU flags set by default (docs/PERFORMANCE.md, "YNNPACK's dots": only reductions, and the
# dots they fuse, go to YNNPACK). They change nothing on other backends. A flag already in
# XLA_FLAGS keeps the user's value.
CPU_XLA_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': 'reduce'}
# Set to 1 to leave XLA_FLAGS as it is (XLA's own defaults; the same-function test uses it).
NO_CPU_FLAGS_ENV = 'VIT_JAX_NO_CPU_FLAGS'
# XLA:CPU mallocs each step's temporaries anew and glibc maps the large ones fresh, faulted in
# 4 KiB at a time; with this tunable glibc asks for transparent huge pages on them
# (docs/PERFORMANCE.md, "The host allocator"; scripts/cpu_env.sh sets it).
HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb=1'


def set_cpu_xla_flags(environ=os.environ) -> str:
  """Adds `CPU_XLA_FLAGS` to `environ['XLA_FLAGS']` (except flags named there already, or all
  with VIT_JAX_NO_CPU_FLAGS=1) and returns the result. XLA parses XLA_FLAGS once, when JAX starts
  its first backend: hence on import of vit_jax, for every command and notebook."""
  current = environ.get('XLA_FLAGS', '')
  if environ.get(NO_CPU_FLAGS_ENV, '') == '1':
    return current
  named = {flag.lstrip('-').split('=')[0] for flag in current.split()}
  extra = [f'--{k}={v}' for k, v in CPU_XLA_FLAGS.items() if k not in named]
  if extra:
    environ['XLA_FLAGS'] = ' '.join([current, *extra]).strip()
  return environ.get('XLA_FLAGS', '')


def check_host_allocator() -> bool:
  """On Linux CPU backends, warns unless GLIBC_TUNABLES asks malloc for huge pages."""
  import jax  # pylint: disable=g-import-not-at-top  # Training has started JAX by now.
  if (jax.default_backend() != 'cpu' or not sys.platform.startswith('linux')
      or HUGEPAGE_TUNABLE in os.environ.get('GLIBC_TUNABLES', '').split(':')):
    return True
  logging.warning('Training on CPU without GLIBC_TUNABLES=%s: steps are 1.2-1.6x slower '
                  '(page faults on every step\'s temporaries). scripts/*.sh set it; for your own '
                  'runs: export GLIBC_TUNABLES=%s', HUGEPAGE_TUNABLE, HUGEPAGE_TUNABLE)
  return False

"""Facts about the backend: peak matmul throughput per device kind (for MFU), the host
allocator's setting, the XLA:CPU flags the project sets, and where remat saves no memory."""
import os
import sys
from typing import Optional

from absl import logging
import jax

# XLA:CPU mallocs each step's temporaries anew; glibc serves the large ones with fresh mmaps,
# faulted in 4 KiB at a time (a third of the demo's CPU time). With this tunable glibc asks for
# transparent huge pages on them (docs/PERFORMANCE.md, "The host allocator").
HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb=1'

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


# Vendor figures, FLOP/s per device (one chip / GPU), dense (no sparsity), bf16 inputs.
PEAK_BF16_FLOPS = {
    'TPU v2': 45e12,
    'TPU v3': 123e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
    'NVIDIA A100': 312e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA L4': 121e12,
}


def peak_flops(device=None, override: Optional[float] = None) -> Optional[float]:
  """Peak FLOP/s of one device: `override` if given, else looked up by device kind.

  Kinds are matched by prefix ('NVIDIA H100 80GB HBM3' -> 'NVIDIA H100'); unknown kinds (CPUs
  among them) give None, and MFU is then not reported unless `override` is set.
  """
  if override:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_BF16_FLOPS[name]
  return None


def check_host_allocator() -> bool:
  """On Linux CPU backends, warns unless GLIBC_TUNABLES asks malloc for huge pages."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if (jax.default_backend() != 'cpu' or not sys.platform.startswith('linux')
      or HUGEPAGE_TUNABLE in tunables.split(':')):
    return True
  logging.warning('Training on CPU without GLIBC_TUNABLES=%s: steps are 1.2-1.6x slower '
                  '(page faults on every step\'s temporaries). scripts/*.sh set it; for your own '
                  'runs: export GLIBC_TUNABLES=%s', HUGEPAGE_TUNABLE, HUGEPAGE_TUNABLE)
  return False


def remat_caveat(backend: str, remat_policy: str, scan_layers: bool) -> Optional[str]:
  """Why `remat_policy` saves no memory on `backend` with this layout, or None.

  XLA:CPU schedules the recomputation of unrolled remat blocks early (nothing orders it after the
  forward pass), so their activations are alive together as without remat; only inside the
  backward loop of `scan_layers` is each block recomputed when it is reached. Measured:
  docs/PERFORMANCE.md, "Rematerialisation needs scan on XLA:CPU".
  """
  if backend == 'cpu' and remat_policy != 'none' and not scan_layers:
    return 'remat without scan_layers saves no memory on XLA:CPU (it recomputes early)'
  return None


def check_remat_layout(model_config) -> bool:
  """Warns when a run's remat would save no memory on this backend (see `remat_caveat`)."""
  caveat = remat_caveat(jax.default_backend(), model_config.get('remat_policy', 'none'),
                        model_config.get('scan_layers', False))
  if caveat:
    logging.warning('%s: set config.model.scan_layers=True too.', caveat)
  return caveat is None

"""Facts about the backend: peak matmul throughput per device kind (for MFU), the host
allocator's setting, the XLA:CPU flags the project sets, and where remat saves no memory."""
import os
import sys
from typing import Dict, Optional

from absl import logging
import jax

# XLA:CPU mallocs each step's temporaries anew; glibc serves the large ones with fresh mmaps,
# faulted in 4 KiB at a time (a third of the demo's CPU time). With this tunable glibc asks for
# transparent huge pages on them (docs/PERFORMANCE.md, "The host allocator").
HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb=1'

# Overrides the memory a train step may use, in GiB per device (see `memory_budget`).
MEMORY_LIMIT_ENV = 'VIT_JAX_MEMORY_LIMIT_GB'

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


# Where the kernel shows this process's control groups (monkeypatched by tests).
CGROUP_ROOT = '/sys/fs/cgroup'
PROC_SELF_CGROUP = '/proc/self/cgroup'
# A cgroup v1 memory limit at least this large means "no limit" (the kernel shows ~2**63).
_NO_CGROUP_LIMIT = 2**60


def _read_number(path: str) -> Optional[int]:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None  # cgroup v2 writes 'max' for no limit.


def _inactive_file(stat_path: str) -> int:
  """Page cache the kernel reclaims before killing anything (memory.stat), in bytes."""
  try:
    with open(stat_path) as f:
      return next((int(line.split()[1]) for line in f
                   if line.split()[0] in ('inactive_file', 'total_inactive_file')), 0)
  except (OSError, ValueError, IndexError):
    return 0


def cgroup_memory_available() -> Optional[int]:
  """Bytes this process's memory cgroup (v2 memory.max, v1 memory.limit_in_bytes; the tightest
  of its own and its ancestors' that are visible) lets it still use: limit - usage + reclaimable
  page cache. None outside a memory-limited cgroup (a container limited to 6 GiB on a 64 GiB host
  gets OOM-killed at 6)."""
  try:
    with open(PROC_SELF_CGROUP) as f:
      entries = [line.rstrip('\n').split(':', 2) for line in f if line.count(':') >= 2]
  except OSError:
    entries = []
  candidates = []  # (limit file, usage file, stat file) of each visible level.
  for _, controllers, group in entries:
    if controllers == '':  # v2, unified hierarchy.
      base, names = CGROUP_ROOT, ('memory.max', 'memory.current', 'memory.stat')
    elif 'memory' in controllers.split(','):
      base = os.path.join(CGROUP_ROOT, 'memory')
      names = ('memory.limit_in_bytes', 'memory.usage_in_bytes', 'memory.stat')
    else:
      continue
    parts = [part for part in group.split('/') if part]
    for depth in range(len(parts), -1, -1):
      level = os.path.join(base, *parts[:depth])
      candidates.append(tuple(os.path.join(level, name) for name in names))
  available = []
  for limit_path, usage_path, stat_path in candidates:
    limit, usage = _read_number(limit_path), _read_number(usage_path)
    if limit is not None and usage is not None and limit < _NO_CGROUP_LIMIT:
      available.append(max(0, limit - usage + _inactive_file(stat_path)))
  return min(available) if available else None


def memory_budget(device=None) -> tuple:
  """(bytes, source): the memory one device's programs may use: $VIT_JAX_MEMORY_LIMIT_GB if set,
  else the device allocator's `bytes_limit` (GPU, TPU), else on CPU the host's available memory
  (MemAvailable) or, when less, what this process's memory cgroup still allows
  (`cgroup_memory_available`), shared by all of this process's CPU devices."""
  override = os.environ.get(MEMORY_LIMIT_ENV)
  if override:
    try:
      return int(float(override) * 2**30), f'${MEMORY_LIMIT_ENV}'
    except ValueError:
      raise ValueError(f'${MEMORY_LIMIT_ENV}={override!r} is not a number of GiB.') from None
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']), f'{device.device_kind} memory (bytes_limit)'
  with open('/proc/meminfo') as f:
    available = next(int(line.split()[1]) * 1024 for line in f
                     if line.startswith('MemAvailable:'))
  where = 'the host\'s available memory'
  cgroup = cgroup_memory_available()
  if cgroup is not None and cgroup < available:
    available, where = cgroup, 'the memory its cgroup (container) limit leaves'
  return available // jax.local_device_count(), (
      f'{where} / {jax.local_device_count()} CPU devices')


def backend_summary() -> str:
  """One line naming the backend, the device kind and count, and the processes."""
  devices = jax.devices()
  return (f'JAX backend {jax.default_backend()}: {len(devices)} x {devices[0].device_kind} '
          f'({jax.local_device_count()} on this process), {jax.process_count()} process(es).')


# Models wider than ViT-S (hidden size 384) are beyond what a CPU trains in reasonable time.
CPU_MAX_HIDDEN_SIZE = 384


def check_accelerator(model_config) -> bool:
  """Warns when a model larger than ViT-S is trained on the CPU backend: JAX for the
  accelerator is probably not installed."""
  hidden_size = model_config.hidden_size or 0  # None: a ResNet-only model.
  if jax.default_backend() != 'cpu' or hidden_size <= CPU_MAX_HIDDEN_SIZE:
    return True
  logging.warning(
      'Training %s (hidden size %d, larger than ViT-S) on the CPU backend: this is very slow. '
      "For the accelerator install JAX with its runtime: pip install -e '.[tpu]' on a Cloud TPU "
      "VM, pip install -e '.[cuda12]' (or '.[cuda13]') on NVIDIA GPUs (README, \"On a Cloud "
      'TPU VM" / "On GPUs").', model_config.model_name, hidden_size)
  return False


def xla_memory(compiled) -> Optional[Dict[str, int]]:
  """Per-device buffer sizes of a compiled program (XLA's buffer assignment), or None."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    analysis = None
  if analysis is None:
    return None
  out = {name: int(getattr(analysis, f'{name}_size_in_bytes', 0) or 0)
         for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  # Donated (aliased) outputs reuse their argument buffers.
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def gib(x: Optional[float]) -> str:
  """A byte count as 'x.xx GiB' or 'x.x MiB' ('n/a' for None)."""
  if x is None:
    return 'n/a'
  return f'{x / 2**30:.2f} GiB' if x >= 2**30 else f'{x / 2**20:.1f} MiB'

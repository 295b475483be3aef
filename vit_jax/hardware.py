"""Facts about the devices: the Cloud TPU generations and slices (cores, hosts, HBM, peak), peak
FLOP/s per device kind (for MFU), and the memory a train step may use with the check against it."""
import dataclasses
import math
import os
from typing import Dict, Optional

from absl import logging
import jax

from vit_jax import logging_util

# Overrides the memory a train step may use, in GiB per device (see `memory_budget`).
MEMORY_LIMIT_ENV = 'VIT_JAX_MEMORY_LIMIT_GB'


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One Cloud TPU generation's documented facts (Cloud TPU docs, tpu/docs/v2 ... v6e). `name`
  starts its accelerator types (`v3-8`), whose number counts TensorCores or chips (`counts`); with
  megacore (v4, v5p) JAX sees one device per chip, otherwise one per TensorCore."""
  name: str
  topology: str  # libtpu's topology prefix (`jax.experimental.topologies`): 'v5e:2x4'
  device_kind: str  # jax.Device.device_kind
  cores_per_chip: int
  megacore: bool
  host_bounds: tuple  # chips per host (x, y, z) in a slice of at least that many chips
  hbm_gib_per_chip: int
  peak_bf16_per_chip: float
  counts: str  # 'cores' | 'chips'
  torus_dims: int  # 2 (AxB) or 3 (AxBxC)

  @property
  def devices_per_chip(self) -> int:
    return 1 if self.megacore else self.cores_per_chip

  @property
  def chips_per_host(self) -> int:
    return math.prod(self.host_bounds)

  @property
  def hbm_bytes_per_device(self) -> int:
    return self.hbm_gib_per_chip * 2**30 // self.devices_per_chip

  @property
  def peak_bf16_per_device(self) -> float:
    return self.peak_bf16_per_chip / self.devices_per_chip


TPU_GENERATIONS = (
    TpuGeneration('v2', 'v2', 'TPU v2', 2, False, (2, 2, 1), 16, 45e12, 'cores', 2),
    TpuGeneration('v3', 'v3', 'TPU v3', 2, False, (2, 2, 1), 32, 123e12, 'cores', 2),
    TpuGeneration('v4', 'v4', 'TPU v4', 2, True, (2, 2, 1), 32, 275e12, 'cores', 3),
    TpuGeneration('v5litepod', 'v5e', 'TPU v5 lite', 1, False, (2, 4, 1), 16, 197e12, 'chips', 2),
    TpuGeneration('v5p', 'v5p', 'TPU v5', 2, True, (2, 2, 1), 95, 459e12, 'cores', 3),
    TpuGeneration('v6e', 'v6e', 'TPU v6 lite', 1, False, (2, 4, 1), 32, 918e12, 'chips', 2),
)
TPU_GENERATIONS_BY_NAME = {g.name: g for g in TPU_GENERATIONS}

# Vendor figures, dense bf16 FLOP/s per JAX device (a TPU core, or a chip with megacore; a GPU).
PEAK_BF16_FLOPS = {
    **{g.device_kind: g.peak_bf16_per_device for g in TPU_GENERATIONS},
    'NVIDIA A100': 312e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA L4': 121e12,
}


def peak_flops(device=None, override: Optional[float] = None) -> Optional[float]:
  """Peak FLOP/s of one device: `override` if given, else by the longest prefix of its kind
  ('NVIDIA H100 80GB HBM3' -> 'NVIDIA H100'; 'TPU v5 lite' is not 'TPU v5'); None if unknown."""
  if override:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_BF16_FLOPS[name]
  return None


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A Cloud TPU slice named by its accelerator type, as libtpu's compiler sees it."""
  accelerator_type: str
  generation: TpuGeneration
  chips: int
  shape: tuple  # chips along each torus axis

  @property
  def devices(self) -> int:
    return self.chips * self.generation.devices_per_chip

  @property
  def hosts(self) -> int:
    return max(1, self.chips // self.generation.chips_per_host)

  @property
  def topology_name(self) -> str:
    return f'{self.generation.topology}:{"x".join(map(str, self.shape))}'

  def topology_kwargs(self) -> dict:
    """Keyword arguments of `jax.experimental.topologies.get_topology_desc`."""
    bounds = self.generation.host_bounds
    if self.chips < self.generation.chips_per_host:  # A slice smaller than one host.
      bounds = tuple(self.shape) + (1,) * (3 - len(self.shape))
    kwargs = {'chips_per_host_bounds': bounds}
    if self.generation.megacore:
      kwargs['chip_config_name'] = 'megacore'
    return kwargs


def _torus_shape(chips: int, dims: int) -> tuple:
  """The slice shape Cloud TPU gives `chips` chips: 2-D 2x2, 2x4, 4x4, 4x8, ...; 3-D 2x2x1,
  2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (the smallest axis doubles, the last of equals first)."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    axis = max(i for i, n in enumerate(shape) if n == smallest)
    shape[axis] *= 2
  return tuple(shape)


def tpu_slice(accelerator_type: str) -> TpuSlice:
  """'v3-8' -> the slice; ValueError naming the known generations for anything else."""
  name, _, count = accelerator_type.strip().lower().rpartition('-')
  generation = TPU_GENERATIONS_BY_NAME.get(name)
  known = ', '.join(f'{g.name}-N' for g in TPU_GENERATIONS)
  if generation is None or not count.isdigit() or int(count) < 1:
    raise ValueError(f'Unknown TPU accelerator type {accelerator_type!r}; expected one of {known} '
                     '(e.g. v3-8, v4-32, v5litepod-16).')
  units = int(count)
  per_chip = generation.cores_per_chip if generation.counts == 'cores' else 1
  chips = units // per_chip
  if units % per_chip or chips & (chips - 1) or chips in (0, 2) or (
      generation.counts == 'cores' and chips < 4):
    raise ValueError(
        f'TPU accelerator type {accelerator_type!r}: a {generation.name} slice has '
        f'{"4" if generation.counts == "cores" else "1, 4"}, 8, 16, ... chips (the name counts '
        f'{generation.counts}, {per_chip} per chip).')
  return TpuSlice(accelerator_type.strip().lower(), generation, chips,
                  _torus_shape(chips, generation.torus_dims))


# Where the kernel shows this process's control groups (monkeypatched by tests).
CGROUP_ROOT = '/sys/fs/cgroup'
PROC_SELF_CGROUP = '/proc/self/cgroup'
# A cgroup v1 memory limit at least this large means "no limit" (the kernel shows ~2**63).
_NO_CGROUP_LIMIT = 2**60
# memory.max, memory.current of cgroup v2 (no controllers named); the v1 memory controller's.
_V2_FILES, _V1_FILES = ('memory.max', 'memory.current'), ('memory.limit_in_bytes',
                                                           'memory.usage_in_bytes')


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ''


def _reclaimable(level: str) -> int:
  """Page cache the kernel reclaims before killing anything (memory.stat), in bytes."""
  words = _read(os.path.join(level, 'memory.stat')).split()
  return next((int(value) for key, value in zip(words[::2], words[1::2])
               if key in ('inactive_file', 'total_inactive_file') and value.isdigit()), 0)


def cgroup_memory_available() -> Optional[int]:
  """Bytes this process's memory cgroup still lets it use (limit - usage + reclaimable page
  cache), the tightest of its own level and the visible ancestors'. None outside a memory-limited
  cgroup (a container limited to 6 GiB on a 64 GiB host is OOM-killed at 6)."""
  available = []
  for line in _read(PROC_SELF_CGROUP).splitlines():
    if line.count(':') < 2:
      continue
    _, controllers, group = line.split(':', 2)
    if controllers == '':
      base, names = CGROUP_ROOT, _V2_FILES
    elif 'memory' in controllers.split(','):
      base, names = os.path.join(CGROUP_ROOT, 'memory'), _V1_FILES
    else:
      continue
    parts = [part for part in group.split('/') if part]
    for depth in range(len(parts) + 1):
      level = os.path.join(base, *parts[:depth])
      limit, usage = (_read(os.path.join(level, name)).strip() for name in names)
      if limit.isdigit() and usage.isdigit() and int(limit) < _NO_CGROUP_LIMIT:
        available.append(max(0, int(limit) - int(usage) + _reclaimable(level)))
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


# A step whose XLA buffers need more than this fraction of the memory budget gets a warning.
MEMORY_WARNING_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class MemoryCheck:
  fits: bool
  close: bool  # Fits, but above MEMORY_WARNING_FRACTION of the budget.
  message: str  # The numbers and what to change ('' when comfortably within the budget).


def check_step_memory(memory: Dict[str, int], budget: int, source: str, config) -> MemoryCheck:
  """A train step's XLA memory analysis (`xla_memory`) against `budget` bytes per device: the
  one check of `vit_jax.train_loop` (before the first step) and of `vit_jax.plan` (TPU HBM)."""
  fits, close = memory['total'] <= budget, memory['total'] > MEMORY_WARNING_FRACTION * budget
  if not close:
    return MemoryCheck(True, False, '')
  gib = logging_util.gib
  message = (
      f'The train step needs {gib(memory["total"])} per device (XLA\'s memory analysis: '
      f'arguments {gib(memory["argument"])}, temporaries {gib(memory["temp"])}) of '
      f'{gib(budget)} ({source}). To need less: raise config.accum_steps (now '
      f'{config.accum_steps}; the batch is split into that many micro-batches), set '
      "config.model.remat_policy='full' (with config.model.scan_layers=True on CPU; now "
      f"{config.model.remat_policy!r}), or config.sharding='fsdp' (now {config.sharding!r}) to "
      'split the train state over the devices.')
  return MemoryCheck(fits, fits, message)


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


def check_attention_impl(model_config, platform: str) -> None:
  """ValueError unless the run's attention implementation compiles for `platform`: Pallas' flash
  attention is a TPU kernel (Mosaic), which the CPU and GPU backends cannot compile."""
  if model_config.get('attention_impl') == 'pallas' and platform != 'tpu':
    raise ValueError(f"config.model.attention_impl='pallas' (Pallas' TPU flash attention) runs on "
                     f"TPUs only, not on the {platform} backend: use 'xla' or 'fused' here.")


def xla_memory(compiled) -> Optional[Dict[str, int]]:
  """Per-device buffer sizes of a compiled program (XLA's buffer assignment), or None."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if analysis is None:
    return None
  out = {name: int(getattr(analysis, f'{name}_size_in_bytes', 0) or 0)
         for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  # Donated (aliased) outputs reuse their argument buffers.
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out

"""Speed and memory of the ViT forward pass or of the real jitted train step: the one timer
(`time_calls`) and the measurements behind `python -m vit_jax.benchmark`.

`run(spec)` compiles and times one `Spec`: the median step after one warm-up step, FLOPs from
`vit_jax.flops` (a train step is 3x the forward; recomputation is not counted, as usual for MFU),
the peak of `vit_jax.hardware`, the peak memory (the device allocator's, else the host's max RSS,
over the whole process so far) and XLA's buffer sizes. A train `Spec` times
`vit_jax.trainer.Trainer.train_step`, state donated and sharded as in training.
`find_max_batch(spec)` searches the largest per-device batch that fits (`largest_fitting`): by
XLA's memory analysis against a limit (default `hardware.memory_budget`, as for training) or by
running one step (an out-of-memory error: does not fit). Single process only.
"""
import dataclasses
import functools
import gc
import os
import platform
import re
import resource
import statistics
import time
from typing import Any, Callable, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import config_lib
from vit_jax import flops
from vit_jax import hardware
from vit_jax import model_configs
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax.logging_util import gib

MODES = ('inference', 'train')
DEFAULT_STEPS = 5

# The keys of every result row (JSON), in print order.
ROW_KEYS = (
    'model', 'resolution', 'mode', 'dtype', 'attention_impl', 'remat_policy', 'scan_layers',
    'sharding', 'optimizer', 'batch', 'batch_per_device', 'num_devices', 'steps',
    'images_per_s', 'step_time_s', 'step_times_s', 'flops_per_image', 'achieved_tflops',
    'peak_flops_per_device', 'mfu', 'lower_s', 'compile_s', 'peak_memory_bytes',
    'peak_memory_source', 'xla_memory', 'pipeline_images_per_s', 'backend', 'device_kind')


@dataclasses.dataclass(frozen=True)
class Spec:
  """One benchmark row. `batch` is global (all devices)."""
  model: str
  resolution: int
  batch: int
  mode: str = 'inference'
  dtype: str = 'float32'
  attention_impl: str = 'xla'
  remat_policy: str = 'none'
  scan_layers: bool = False
  sharding: str = 'replicate'
  optimizer: str = 'sgd'
  num_devices: Optional[int] = None  # None: all devices.
  num_classes: int = 1000
  steps: int = DEFAULT_STEPS
  # The model config to time instead of MODEL_CONFIGS[model] (e.g. a workdir's own model).
  config: Optional[Any] = dataclasses.field(default=None, compare=False)

  def devices(self) -> list:
    devices = jax.devices()
    if self.num_devices is None:
      return devices
    if not 1 <= self.num_devices <= len(devices):
      raise ValueError(f'num_devices={self.num_devices}; this process has {len(devices)}.')
    return devices[:self.num_devices]

  def model_config(self):
    cfg = (model_configs.get_model_config(self.model) if self.config is None
           else self.config.copy_and_resolve_references())
    cfg.attention_impl = self.attention_impl
    cfg.remat_policy = self.remat_policy
    cfg.scan_layers = self.scan_layers
    return cfg


def peak_memory(device) -> tuple:
  """(bytes, source): the device allocator's peak where the backend reports one (GPU, TPU), else
  this process's host max RSS (CPU). Both are peaks over the whole process so far."""
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host max RSS'  # KiB


def _cpu_info() -> dict:
  """The host CPU's model name and widest x86 vector ISA ('avx512', 'avx2', or '' elsewhere):
  the ISA decides how fast XLA's and PyTorch's fp32 kernels are, and so the ratio to timm
  (docs/PERFORMANCE.md)."""
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
  except OSError:
    text = ''
  name = re.search(r'^model name\s*:\s*(.+)$', text, re.M)
  flags = re.search(r'^flags\s*:(.*)$', text, re.M)
  flags = set(flags.group(1).split()) if flags else set()
  isa = next((isa for isa, flag in (('avx512', 'avx512f'), ('avx2', 'avx2')) if flag in flags), '')
  return {'host_cpu': name.group(1).strip() if name else platform.processor() or platform.machine(),
          'host_vector_isa': isa}


def machine() -> dict:
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), **_cpu_info(),
          'host_cpu_count': os.cpu_count(), 'jax': jax.__version__}


@dataclasses.dataclass
class _Workload:
  """What one timed step runs."""
  jitted: Any
  abstract_args: tuple
  make_args: Any  # () -> concrete args for the first call.
  step: Any  # (compiled, args) -> args for the next call, after blocking on this one.


def random_params(abstract_params, shardings, seed: int = 0):
  """Random parameters shaped like `abstract_params`, placed with `shardings`: throughput does not
  depend on the values, and numpy compiles nothing."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a, s: jax.device_put(0.02 * rng.standard_normal(a.shape, np.float32), s),
      abstract_params, shardings)


def time_calls(call, steps: int) -> list:
  """Wall time of each of `steps` calls of `call()` (which must block until its work is done),
  after one untimed warm-up call: the one timer of every speed figure."""
  call()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


def _random_batch(spec: Spec, mesh, seed: int = 0):
  rng = np.random.default_rng(seed)
  r = spec.resolution
  images = rng.uniform(-1, 1, (spec.batch, r, r, 3)).astype(np.float32)
  labels = rng.integers(0, spec.num_classes, spec.batch).astype(np.int32)
  put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
  return put(images), put(labels)


def _inference_workload(spec: Spec, mesh) -> _Workload:
  cfg = spec.model_config()
  model = models.build_model(cfg, spec.num_classes, dtype=jnp.dtype(spec.dtype))
  r = spec.resolution
  abstract_params = models.abstract_params(cfg, spec.num_classes, r)
  param_shardings = sharding.state_shardings(abstract_params, mesh, spec.sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False),
                    in_shardings=(param_shardings, batch_sharding), out_shardings=batch_sharding)
  abstract = (
      jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                   abstract_params, param_shardings),
      jax.ShapeDtypeStruct((spec.batch, r, r, 3), jnp.float32, sharding=batch_sharding))

  def make_args():
    return random_params(abstract_params, param_shardings), _random_batch(spec, mesh)[0]

  def step(compiled, args):
    compiled(*args).block_until_ready()
    return args

  return _Workload(forward, abstract, make_args, step)


def run_config(spec: Spec):
  """The `config_lib.base_config()` run config of `spec` (model switches in `config.model`),
  validated as training validates it: every field in its table, the batch split over the
  devices, the resolution a multiple of the patch size. Raises ValueError naming the field."""
  if spec.mode not in MODES:
    raise ValueError(f'mode={spec.mode!r}; expected one of {MODES}.')
  if spec.steps < 1:
    raise ValueError(f'steps={spec.steps}; expected at least 1.')
  config = config_lib.base_config()
  config.model = spec.model_config()
  config.pp.resolution = spec.resolution
  config.batch = config.batch_eval = spec.batch
  config.num_classes = spec.num_classes
  config.dtype = spec.dtype
  config.sharding = spec.sharding
  config.optimizer = spec.optimizer
  config_lib.validate(config, num_devices=len(spec.devices()), process_count=1)
  return config


def _train_workload(spec: Spec, mesh) -> _Workload:
  from vit_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  trainer = trainer_lib.Trainer(run_config(spec), spec.num_classes, mesh=mesh)

  def make_args():
    images, labels = _random_batch(spec, mesh)
    return trainer.initial_state(), {'image': images, 'label': labels}

  def step(compiled, args):
    state, batch = args
    state, metrics = compiled(state, batch)  # The old state is donated.
    jax.block_until_ready((state, metrics))
    return state, batch

  return _Workload(trainer.train_step, (trainer.abstract_state, trainer.abstract_batch),
                  make_args, step)


def stepper(workload: _Workload, compiled):
  """A no-argument callable that runs one step of `compiled` and waits for it, threading the
  workload's arguments (the train state) from call to call."""
  args = [workload.make_args()]

  def call():
    args[0] = workload.step(compiled, args[0])

  return call


def compiled_stepper(spec: Spec):
  """`stepper` for `spec` compiled on its devices: what `vit_jax.compare_timm` times."""
  run_config(spec)
  workload, compiled, _, _ = _compile(spec)
  return stepper(workload, compiled)


def _compile(spec: Spec):
  """(workload, compiled program, lowering seconds, compile seconds) of `spec` on its devices."""
  mesh = sharding.make_mesh(spec.devices())
  workload = (_train_workload if spec.mode == 'train' else _inference_workload)(spec, mesh)
  start = time.perf_counter()
  lowered = workload.jitted.lower(*workload.abstract_args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  return workload, compiled, lower_s, time.perf_counter() - start


def pipeline_images_per_s(config, steps: int) -> float:
  """Images/s of `config`'s host training pipeline (this process's share of each batch), timed
  by `time_calls` over `steps` batches."""
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow.
  iterator = input_pipeline.build_train_iterator(config)
  times = time_calls(lambda: next(iterator), steps)
  return steps * config.batch / jax.process_count() / sum(times)


def fashion_mnist_config(spec: Spec, *, data_dir: Optional[str] = None,
                         shuffle_buffer: Optional[int] = None):
  """The run config of the pipeline timed beside a row: fashion_mnist at spec's resolution and
  batch, the default preprocessing. The shuffle buffer only changes the untimed start-up."""
  config = config_lib.base_config()
  config_lib.set_dataset(config, 'fashion_mnist')
  config.data_dir = data_dir
  config.pp.resolution = spec.resolution
  config.batch = spec.batch
  if shuffle_buffer:
    config.shuffle_buffer = shuffle_buffer
  return config


def _described(spec: Spec, model: str) -> dict:
  """What a result says about its spec: the model as `model`, the switches and the devices."""
  device = spec.devices()[0]
  return {
      'model': model, 'resolution': spec.resolution, 'mode': spec.mode, 'dtype': spec.dtype,
      'attention_impl': spec.attention_impl, 'remat_policy': spec.remat_policy,
      'scan_layers': spec.scan_layers, 'sharding': spec.sharding,
      'optimizer': spec.optimizer if spec.mode == 'train' else None,
      'num_devices': len(spec.devices()), 'backend': device.platform,
      'device_kind': device.device_kind}


def run(spec: Spec, *, peak_flops: Optional[float] = None, compile_only: bool = False) -> dict:
  """Compiles and times one row; returns its figures (keys `ROW_KEYS`; the speed figures None
  with `compile_only`, `pipeline_images_per_s` always: measured apart, after the rows)."""
  run_config(spec)
  devices = spec.devices()
  jax.clear_caches()
  workload, compiled, lower_s, compile_s = _compile(spec)
  times = [] if compile_only else time_calls(stepper(workload, compiled), spec.steps)
  step_time = statistics.median(times) if times else None
  images_per_s = spec.batch / step_time if times else None
  cfg = spec.model_config()
  per_image = (flops.train_step_flops if spec.mode == 'train' else flops.forward_flops)(
      cfg, spec.resolution, spec.num_classes)
  peak = hardware.peak_flops(devices[0], override=peak_flops)
  achieved = images_per_s * per_image if times else None
  memory, memory_source = peak_memory(devices[0])
  row = {
      **_described(spec, cfg.model_name),
      'batch': spec.batch, 'batch_per_device': spec.batch // len(devices), 'steps': spec.steps,
      'images_per_s': images_per_s, 'step_time_s': step_time, 'step_times_s': times,
      'flops_per_image': per_image, 'achieved_tflops': achieved and achieved / 1e12,
      'peak_flops_per_device': peak,
      'mfu': achieved / (peak * len(devices)) if peak and achieved else None,
      'lower_s': lower_s, 'compile_s': compile_s,
      'peak_memory_bytes': memory, 'peak_memory_source': memory_source,
      'xla_memory': hardware.xla_memory(compiled), 'pipeline_images_per_s': None,
  }
  del compiled, workload
  gc.collect()
  return row


def forward_speed(model_config, *, resolution: int, batch_size: int, num_classes: int = 1000,
                  steps: int = DEFAULT_STEPS) -> dict:
  """`run` of the forward pass of `model_config` on one device, as the analyses and the claims
  record it (images/s from the median step, the peak memory and its source, XLA's bytes)."""
  row = run(Spec(model=model_config.model_name, config=model_config, resolution=resolution,
                 batch=batch_size, num_devices=1, num_classes=num_classes, steps=steps))
  return {'model': row['model'], 'resolution': resolution, 'batch_size': batch_size,
          'images_per_s': row['images_per_s'], 'seconds_per_batch': row['step_time_s'],
          'peak_memory_bytes': row['peak_memory_bytes'],
          'memory_source': row['peak_memory_source'],
          'xla_program_bytes': row['xla_memory'] and row['xla_memory']['total'],
          'backend': row['backend'], 'device': row['device_kind']}


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return any(s in text for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory',
                                 'OOM', 'Allocator'))


def _probe(spec: Spec, method: str, limit: int) -> dict:
  """Whether `spec` fits: compile and compare XLA's memory analysis with `limit` (analysis), or
  compile and run one step (run)."""
  jax.clear_caches()
  probe = {'batch_per_device': spec.batch // len(spec.devices()), 'bytes': None}
  try:
    workload, compiled, _, compile_s = _compile(spec)
    probe['compile_s'] = compile_s
    memory = hardware.xla_memory(compiled)
    probe['bytes'] = memory and memory['total']
    if method == 'analysis':
      if memory is None:
        raise ValueError('This backend has no compiled.memory_analysis(); use '
                         '--max_batch_method=run.')
      probe['fits'] = memory['total'] <= limit
    else:
      workload.step(compiled, workload.make_args())
      probe['fits'] = True
  except (jax.errors.JaxRuntimeError, MemoryError) as e:
    if not (isinstance(e, MemoryError) or _is_oom(e)):
      raise
    probe.update(fits=False, error=str(e).splitlines()[0][:200])
  finally:
    workload = compiled = None  # pylint: disable=unused-variable
    gc.collect()
  return probe


def largest_fitting(probe: Callable[[int], tuple], *, start: int, cap: int, granularity: int = 1,
                    relative_granularity: float = 0.0) -> Tuple[int, Optional[int]]:
  """The largest n in [0, cap] for which probe(n) fits, and the smallest n probed that does not
  (None if none). probe(n) -> (fits, bytes, limit), either number None where unknown. Bytes grow
  about linearly in n, so a secant step through the two probes nearest the bracket predicts where
  they reach the limit; outside the bracket, doubling (no failure yet) or bisection. Stops when
  the bracket is `granularity` wide (1: exact), or `relative_granularity` times the largest fit."""
  points, good, bad, limit = {}, 0, None, None
  n = max(1, min(start, cap))
  while True:
    fits, size, known_limit = probe(n)
    points[n], limit = size, known_limit or limit
    good, bad = (n, bad) if fits else (good, n)
    width = max(1, granularity, int(relative_granularity * good))
    if good >= cap or (bad is not None and bad - good <= width):
      return good, bad
    n = _next_probe(points, good, bad, limit, cap)


def _next_probe(points: dict, good: int, bad: Optional[int], limit, cap: int) -> int:
  guess = None
  known = sorted((b for b, size in points.items() if size is not None), key=lambda b: abs(b - good))
  if points.get(good) is not None and points.get(bad) is not None:
    known = [good, bad]  # Interpolate across the bracket rather than extrapolate.
  if limit is not None and len(known) >= 2:
    (b1, t1), (b2, t2) = sorted((b, points[b]) for b in known[:2])
    if t2 > t1:
      guess = int(b1 + (limit - t1) * (b2 - b1) / (t2 - t1))
  if bad is None:  # No failure yet: just above the guess (to bracket it), else double.
    return min(cap, guess + max(1, guess // 16) if guess is not None and guess > good
               else 2 * good)
  return guess if guess is not None and good < guess < bad else (good + bad) // 2


def find_max_batch(spec: Spec, *, method: str = 'analysis',
                   memory_limit_bytes: Optional[int] = None, start: Optional[int] = None,
                   cap: int = 4096, granularity: int = 1) -> dict:
  """Largest per-device batch (<= cap) that fits (`largest_fitting`, from `start`, default
  spec's batch per device). Returns the answer, the limit used and every probe (batch per
  device, bytes, fits)."""
  if method not in ('analysis', 'run'):
    raise ValueError(f"method={method!r}; expected 'analysis' or 'run'.")
  run_config(spec)
  n = len(spec.devices())
  limit, limit_source = ((memory_limit_bytes, 'given') if memory_limit_bytes
                         else hardware.memory_budget(spec.devices()[0]))
  probes = {}

  def probe(per_device: int) -> tuple:
    probes[per_device] = _probe(dataclasses.replace(spec, batch=per_device * n), method, limit)
    result = probes[per_device]
    logging.info('batch/device %6d: %s (XLA program %s)', per_device,
                 'fits' if result['fits'] else 'does not fit', gib(result['bytes']))
    return result['fits'], result['bytes'], limit

  good, bad = largest_fitting(probe, start=start or spec.batch // n, cap=cap,
                              granularity=granularity)
  return {
      **_described(spec, spec.model), 'method': method, 'memory_limit_bytes': limit,
      'memory_limit_source': limit_source, 'cap': cap, 'granularity': max(1, granularity),
      'max_batch_per_device': good, 'capped': good >= cap, 'smallest_failure_per_device': bad,
      'probes': [dict(probes[k]) for k in sorted(probes)],
  }

"""The training program compiled ahead of time for a Cloud TPU slice, on any machine.

libtpu's compiler (`pip install -e '.[tpu]'`) gives compile-only devices of a real slice;
`vit_jax.trainer.Trainer` over a mesh of them jits the very train and eval steps of
`python -m vit_jax.main`, and XLA:TPU compiles them. Per device: XLA's buffer sizes, FLOPs, HBM
bytes accessed and the compiler's cost-model estimate (kept only where positive: it is negative
on v4). A program that does not fit fails with RESOURCE_EXHAUSTED, whose numbers
`out_of_memory` reads.

XLA's cost analysis counts a loop's body once, so with `scan_layers`, `accum_steps > 1` or FSDP
`counted_cost` compiles the step unrolled and unaccumulated at 1 and 2 encoder blocks and 1 and 2
images per device, and extrapolates linearly in both (identical blocks, the same work per image).
FSDP is there because XLA:TPU may turn a matmul with an all-gathered operand into a loop over the
shards ("windowed einsum"; ViT-H/14 at 378px on v5e counted 0.71x of its FLOPs), which the counted
copies are compiled without (COUNTING_OPTIONS).

libtpu's compiler may kill its process: 0.0.42.1 overflows a compiler thread's stack on the ResNet
hybrids for v6e, in some attempts only (docs/TPU.md). `in_child` compiles in a process of its own
and tries again, so that a crash costs an attempt, not the command.
"""
import dataclasses
import itertools
import contextlib
import ctypes
import importlib.util
import math
import multiprocessing
import os
import pickle
import re
import signal
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import cli
from vit_jax import config_lib
from vit_jax import hardware
from vit_jax import trainer as trainer_lib
from vit_jax import sharding

INSTALL_HINT = "pip install -e '.[tpu]'"


def compile_only_devices(tpu: hardware.TpuSlice) -> list:
  """The slice's devices for compilation only (nothing runs on them)."""
  if importlib.util.find_spec('libtpu') is None:
    raise cli.UserError(f'Compiling for {tpu.accelerator_type} needs the TPU compiler (libtpu), '
                        f'which is not installed: {INSTALL_HINT}')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  with _off_tpu_vm_environment(tpu):
    return list(topologies.get_topology_desc(
        platform='tpu', topology_name=tpu.topology_name, **tpu.topology_kwargs()).devices)


@contextlib.contextmanager
def _off_tpu_vm_environment(tpu: hardware.TpuSlice):
  """Off a TPU VM, tells libtpu (while it loads) not to ask the absent metadata server nor take
  its machine-wide lock (which would fail a second compiling process). These variables, and
  those libtpu sets in the C environment (CLOUD_TPU_TASK_ID, ...), are removed after: left set,
  they would make a later `vit_jax.main` here or in a child join a TPU pod."""
  if os.path.exists('/dev/accel0') or os.path.exists('/dev/vfio/0'):  # On a TPU VM.
    yield
    return
  added = {key: value for key, value in (
      ('TPU_SKIP_MDS_QUERY', '1'), ('TPU_WORKER_HOSTNAMES', 'localhost'),
      ('TPU_ACCELERATOR_TYPE', tpu.accelerator_type), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'))
           if key not in os.environ}
  before = _c_environment_names()
  os.environ.update(added)
  try:
    yield
  finally:
    for key in (_c_environment_names() - before) | set(added):
      os.environ.pop(key, None)
      os.unsetenv(key)


def _c_environment_names() -> set:
  """Names in the process's C environment (`environ`), where native code sets variables."""
  environ = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), 'environ')
  names = set()
  for i in itertools.count():
    if environ[i] is None:
      return names
    names.add(environ[i].split(b'=', 1)[0].decode(errors='replace'))


# RESOURCE_EXHAUSTED: ... required for HLO temporaries (138.11G) exceeds available HBM (15.48G)
_OOM = re.compile(r'\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def out_of_memory(error: Exception) -> Optional[dict]:
  """{'required_bytes', 'available_bytes', 'message'} of XLA:TPU's out-of-HBM error, else None."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  match = _OOM.search(text)
  size = lambda number, unit: int(float(number) * _UNITS[unit])
  message = next(line for line in text.splitlines() if 'RESOURCE_EXHAUSTED' in line)
  return {'required_bytes': match and size(match[1], match[2]),
          'available_bytes': match and size(match[3], match[4]), 'message': message.strip()}


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded jax.ShapeDtypeStructs."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(abstract_tree))


@dataclasses.dataclass
class StepReport:
  """One compiled step, per device (the `--json_out` fields of `python -m vit_jax.plan`)."""
  arguments_bytes: int
  temporaries_bytes: Optional[int]
  total_bytes: Optional[int]
  fits: bool
  flops_per_device: Optional[float]
  bytes_accessed_per_device: Optional[float]
  compiler_estimate_s: Optional[float]
  compile_s: float
  out_of_memory: Optional[dict] = None  # The compiler's RESOURCE_EXHAUSTED numbers.

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    if out['out_of_memory'] is None:
      del out['out_of_memory']
    return out


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def compile_step(jitted, args, hbm_bytes: int, config, source: str,
                 compiler_options: Optional[dict] = None) -> StepReport:
  """Compiles `jitted` for `args` (sharded ShapeDtypeStructs) and checks it against `hbm_bytes`
  per device (hardware.check_step_memory, as a training run does before its first step)."""
  arguments = per_device_bytes(args)
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile(compiler_options)
  except jax.errors.JaxRuntimeError as e:
    oom = out_of_memory(e)
    if oom is None:
      raise
    temporaries = oom['required_bytes']
    return StepReport(arguments, temporaries, temporaries and arguments + temporaries, False,
                      None, None, None, time.perf_counter() - start, oom)
  compile_s = time.perf_counter() - start
  memory, cost = hardware.xla_memory(compiled), _cost(compiled)
  estimate = cost.get('optimal_seconds')
  valid = estimate is not None and math.isfinite(estimate) and estimate > 0
  check = hardware.check_step_memory(memory, hbm_bytes, source, config)
  return StepReport(memory['argument'], memory['temp'], memory['total'], check.fits,
                    cost.get('flops'), cost.get('bytes accessed'), estimate if valid else None,
                    compile_s)


def eval_batch(config, mesh) -> dict:
  """One global eval batch, laid out as the eval step takes it."""
  spec = sharding.batch_sharding(mesh)
  size, resolution = config.batch_eval, config.pp.resolution
  return {'image': jax.ShapeDtypeStruct((size, resolution, resolution, 3), jnp.float32,
                                        sharding=spec),
          'label': jax.ShapeDtypeStruct((size,), jnp.int32, sharding=spec),
          'mask': jax.ShapeDtypeStruct((size,), jnp.bool_, sharding=spec)}


def num_classes(config: ml_collections.ConfigDict) -> int:
  """config.num_classes, else the dataset's from config_lib.DATASETS (no dataset is opened)."""
  if config.num_classes:
    return config.num_classes
  known = config_lib.DATASETS.get(config.dataset, {}).get('num_classes')
  if known is None:
    raise cli.UserError(f'The number of classes of dataset {config.dataset!r} is not in '
                        'vit_jax.config_lib.DATASETS: set --config.num_classes.')
  return known


def _compile_program(config, classes: int, tpu: hardware.TpuSlice, devices, with_eval: bool,
                     compiler_options: Optional[dict] = None):
  mesh = sharding.make_mesh(devices)
  trainer = trainer_lib.Trainer(config, classes, mesh=mesh)
  hbm = tpu.generation.hbm_bytes_per_device
  source = f'{tpu.generation.device_kind} HBM per device'
  train = compile_step(trainer.train_step, (trainer.abstract_state, trainer.abstract_batch), hbm,
                       config, source, compiler_options)
  evaluation = None
  if with_eval:
    evaluation = compile_step(trainer.eval_step,
                              (trainer.abstract_state['params'], eval_batch(config, mesh)), hbm,
                              config, source, compiler_options)
  return {'train': train, 'eval': evaluation}


def has_loops(config) -> bool:
  """Whether the compiled steps may hold loops whose cost XLA counts once (module docstring)."""
  return (config.accum_steps > 1 or bool(config.model.get('scan_layers'))
          or config.sharding == 'fsdp')


# libtpu flags for counted_cost's compiles: no windowed-einsum loops (module docstring). The same
# arithmetic, so the same FLOPs as the real program; its HBM bytes without those loops' overlap.
COUNTING_OPTIONS = {'xla_tpu_enable_windowed_einsum_for_all_gather': False,
                    'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}


COST_FIELDS = ('flops_per_device', 'bytes_accessed_per_device')


def counted_cost(config, classes: int, tpu: hardware.TpuSlice, devices, with_eval: bool) -> dict:
  """{'train'/'eval': {COST_FIELDS: per device per step}} of `config`'s steps without loops,
  extrapolated from small compiles (module docstring); a model of at most 2 blocks (or a ResNet
  alone) is compiled whole, at 1 and 2 images per device."""
  n = len(devices)
  blocks = config.model.transformer.num_layers if config.model.transformer else None
  blocks = blocks if blocks and blocks > 2 else None
  points = {}
  for layers, per_device in itertools.product((1, 2) if blocks else (None,), (1, 2)):
    small = config.copy_and_resolve_references()
    small.model.scan_layers, small.accum_steps = False, 1
    small.batch = small.batch_eval = n * per_device
    if blocks:
      small.model.transformer.num_layers = layers
    points[layers, per_device] = _compile_program(small, classes, tpu, devices, with_eval,
                                                  COUNTING_OPTIONS)
  # Least squares on [1, L, b, L*b] (exact through the 4 points; [1, b] for the whole model).
  design = lambda layers, b: [1.0, b] + ([layers, layers * b] if blocks else [])
  rows = np.array([design(*key) for key in points])
  target = {'train': config.batch // n, 'eval': config.batch_eval // n}
  out = {}
  for step in ('train', 'eval') if with_eval else ('train',):
    out[step] = {}
    for field in COST_FIELDS:
      values = [getattr(p[step], field) for p in points.values()]
      if None in values:
        raise ValueError(f'{config.model.model_name}: the {step} step does not fit even at 1 image '
                         'per device (to count its FLOPs); try --config.sharding=fsdp.')
      values = np.array(values, np.float64)
      coef = np.linalg.lstsq(rows, values, rcond=None)[0]
      out[step][field] = float(np.dot(coef, design(blocks, target[step])))
  return out


def compile_train_and_eval(config: ml_collections.ConfigDict, tpu: hardware.TpuSlice,
                           devices=None, *, with_eval: bool = True,
                           count_cost: bool = True) -> dict:
  """{'train': StepReport, 'eval': StepReport or None} for `config` on `tpu` (ValueError for a
  config the slice cannot run). Without `count_cost`, loops keep the compiler's once-per-loop
  counts (`count_loops`)."""
  devices = devices or compile_only_devices(tpu)
  config_lib.validate(config, num_devices=len(devices), process_count=tpu.hosts)
  reports = _compile_program(config, num_classes(config), tpu, devices, with_eval)
  if count_cost:
    count_loops(reports, config, tpu, devices)
  return reports


def count_loops(reports: dict, config, tpu: hardware.TpuSlice, devices) -> None:
  """With loops in the steps (even one that does not fit), sets `reports`' FLOPs and bytes from
  `counted_cost` and drops the compiler's estimate, which counted each loop body once too."""
  if not has_loops(config):
    return
  with_eval = reports.get('eval') is not None
  for step, cost in counted_cost(config, num_classes(config), tpu, devices, with_eval).items():
    for field, value in cost.items():
      setattr(reports[step], field, value)
    reports[step].compiler_estimate_s = None


# Attempts of a compile whose process the compiler kills, and the signals that mean it did.
CRASH_ATTEMPTS = 3
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)


class CompilerCrash(cli.UserError):
  """libtpu's compiler killed its process in every attempt."""


def in_child(fn: Callable[..., Any], *args, attempts: int = CRASH_ATTEMPTS, **kwargs) -> Any:
  """`fn(*args, **kwargs)` (picklable, compile-only: the child runs on the CPU backend) in a
  spawned process; its exception is raised here. A child killed by one of CRASH_SIGNALS is
  started again, `attempts` times in all, then CompilerCrash."""
  context = multiprocessing.get_context('spawn')
  for attempt in range(1, attempts + 1):
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, args, kwargs))
    child.start()
    send.close()
    try:
      outcome = receive.recv()
    except EOFError:  # The child died without an answer.
      outcome = None
    finally:
      child.join()
      receive.close()
    if outcome is not None:
      value, raised = outcome
      if raised:
        raise value
      return value
    if -child.exitcode not in CRASH_SIGNALS:  # SIGKILL: the OOM killer or a user.
      raise RuntimeError(f'The compiling process exited with {child.exitcode}; its log is above.')
    crash = signal.Signals(-child.exitcode).name
    logging.warning("libtpu's compiler crashed (%s) in attempt %d of %d.", crash, attempt,
                    attempts)
  raise CompilerCrash(f"libtpu's compiler crashed ({crash}) in all {attempts} attempts (a known "
                      'stack overflow of libtpu on the ResNet hybrids for v6e, docs/TPU.md). Run '
                      'the command again, or plan for another TPU generation.')


def _child(send, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
  """`in_child`'s process: sends back (result, False) or (exception, True); an exception that
  does not survive pickling goes as a RuntimeError with its text."""
  jax.config.update('jax_platforms', 'cpu')
  try:
    outcome = fn(*args, **kwargs), False
  except Exception as e:  # pylint: disable=broad-except
    outcome = e, True
    try:
      pickle.loads(pickle.dumps(e))
    except Exception:  # pylint: disable=broad-except
      outcome = RuntimeError(f'{type(e).__name__}: {e}'), True
  send.send(outcome)

"""What `python -m vit_jax.plan` computes: a config's train and eval steps compiled for Cloud TPU
slices (vit_jax.tpu_compile), whole-run totals, and when the train step does not fit, the smallest
change of `accum_steps`, `model.remat_policy`, `sharding` and `model.scan_layers` that does,
each candidate compiled to check it."""
import math
from typing import Iterator, Optional

import ml_collections

from vit_jax import flops
from vit_jax import hardware
from vit_jax import tpu_compile

SECONDS_PER_DAY = 86_400
# At most this many candidate changes are compiled when a step does not fit.
MAX_CANDIDATES = 8
# XLA's FLOPs per image over vit_jax.flops' matmul count above which a step of a real model
# recomputes, or draws dropout's random bits (XLA also counts norms, softmax, GELU, the loss and
# the update, tests/test_plan.py; and the random bits: ViT-Ti/16 pre-training at 224px counts
# 1.18x with dropout 0.1, 1.01x without).
RECOMPUTE_RATIO = 1.15
# Below this ratio the counted FLOPs (XLA's, over loops by tpu_compile.counted_cost) miss work
# that the matmuls alone need; the analytic count is then the better figure. Seen once, ViT-H/14
# with FSDP on v5e at 0.55x, before counted_cost turned off the compiler's windowed-einsum loops.
UNDERCOUNT_RATIO = 0.9


def with_changes(config: ml_collections.ConfigDict, changes: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with {'accum_steps': 4, 'model.remat_policy': 'full', ...} set."""
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(changes)
  return config


def as_flags(changes: dict) -> str:
  return ' '.join(f'--config.{name}={value}' for name, value in changes.items())


def _accum_choices(config, devices: int, start: int) -> list:
  """accum_steps values from `start` (powers of two) that split the batch over the devices."""
  out, k = [], max(2, 2**math.ceil(math.log2(max(start, 1))))
  while config.batch % k == 0 and (config.batch // k) % devices == 0:
    out.append(k)
    k *= 2
  return out


def candidates(config, failed: tpu_compile.StepReport, hbm: int, devices: int) -> Iterator[dict]:
  """Changes to try, cheapest in step time first: scanned layers (none), FSDP (communication),
  saving only matmul outputs (some recompute), accumulation (smaller matmuls), full remat (a
  second forward pass), then full remat with accumulation and FSDP. Scanning and partial remat
  are skipped when the compiler reported a larger gap than they close; accumulation starts at
  the split the gap suggests."""
  oom = failed.out_of_memory or {}
  available = oom.get('available_bytes') or hbm
  need = failed.total_bytes or 2 * available
  state = failed.arguments_bytes
  has_blocks = config.model.transformer is not None
  if has_blocks and not config.model.scan_layers and need < 1.2 * available:
    yield {'model.scan_layers': True}
  fsdp = {} if config.sharding == 'fsdp' else {'sharding': 'fsdp'}
  if fsdp:  # Splits the state, its gradients and the optimizer's temporaries.
    yield fsdp
  if has_blocks and config.model.remat_policy == 'none' and need < 2 * available:
    yield {'model.remat_policy': 'dots_saveable'}
  room = max(available - state, available / 8)
  start = config.accum_steps * math.ceil((need - state) / room)
  for k in _accum_choices(config, devices, start)[:2]:
    yield {'accum_steps': k}
  if has_blocks and config.model.remat_policy != 'full':
    remat = {'model.remat_policy': 'full'}
    yield remat
    for k in _accum_choices(config, devices, max(2, start // 4)):
      yield {**remat, **fsdp, 'accum_steps': k}


def suggest(config, tpu: hardware.TpuSlice, devices, failed: tpu_compile.StepReport,
            max_candidates: int = MAX_CANDIDATES) -> Optional[dict]:
  """{'changes', 'flags', 'train'} of the first candidate whose train step fits, or None."""
  tried = 0
  for changes in candidates(config, failed, tpu.generation.hbm_bytes_per_device, len(devices)):
    if tried == max_candidates:
      break
    tried += 1
    changed = with_changes(config, changes)
    # Costs are counted (more compiles) only for the candidate that fits.
    reports = tpu_compile.compile_train_and_eval(changed, tpu, devices, with_eval=False,
                                                 count_cost=False)
    if reports['train'].fits:
      tpu_compile.count_loops(reports, changed, tpu, devices)
      return {'changes': changes, 'flags': as_flags(changes), 'train': reports['train']}
  return None


def flops_ratio(whole_run: dict) -> tuple:
  """(a plan's counted FLOPs per image over vit_jax.flops' count, 'recompute' above
  RECOMPUTE_RATIO, 'undercount' below UNDERCOUNT_RATIO, else None)."""
  ratio = whole_run['flops_per_image'] / whole_run['analytic_flops_per_image']
  kind = ('recompute' if ratio > RECOMPUTE_RATIO else
          'undercount' if ratio < UNDERCOUNT_RATIO else None)
  return ratio, kind


def describe_flops_ratio(whole_run: dict) -> str:
  """A plan's counted FLOPs per image against vit_jax.flops' count, and what the ratio means."""
  ratio, kind = flops_ratio(whole_run)
  text = (f'{ratio:.2f}x the analytic forward + backward count per image (above '
          f'~{RECOMPUTE_RATIO} for a ViT of Ti size or more: recomputation, by remat or by the '
          "compiler to fit the HBM, or dropout's random bits)")
  if kind == 'undercount':
    text += f'; below {UNDERCOUNT_RATIO}, the count misses work: the totals above are too low'
  return text


def plan(config, accelerator_type: str, *, utilization: float, with_eval: bool = True,
         with_suggestion: bool = True, max_candidates: int = MAX_CANDIDATES) -> dict:
  """One slice's plan: the `--json_out` object of `python -m vit_jax.plan`."""
  tpu = hardware.tpu_slice(accelerator_type)
  devices = tpu_compile.compile_only_devices(tpu)
  reports = tpu_compile.compile_train_and_eval(config, tpu, devices, with_eval=with_eval)
  train = reports['train']
  found = None
  if with_suggestion and not train.fits:
    found = suggest(config, tpu, devices, train, max_candidates)
  counted = train if train.fits else found and found['train']
  generation = tpu.generation
  out = {
      'topology': tpu.accelerator_type, 'devices': len(devices), 'hosts': tpu.hosts,
      'device_kind': generation.device_kind, 'libtpu_topology': tpu.topology_name,
      'hbm_bytes_per_device': generation.hbm_bytes_per_device,
      'peak_bf16_flops_per_device': generation.peak_bf16_per_device,
      'batch': config.batch, 'total_steps': config.total_steps,
      'train': train.to_json(), 'eval': reports['eval'] and reports['eval'].to_json(),
      'suggestion': found and found['flags'],
      'suggested_train': found and found['train'].to_json(),
  }
  if counted is not None and counted.flops_per_device:
    step_flops = counted.flops_per_device * len(devices)
    total = step_flops * config.total_steps
    core_peak = generation.peak_bf16_per_chip / generation.cores_per_chip
    out['whole_run'] = {
        'flops_per_image': step_flops / config.batch, 'total_flops': total,
        'analytic_flops_per_image': flops.train_step_flops(
            config.model, config.pp.resolution, tpu_compile.num_classes(config)),
        'utilization': utilization,
        'core_days': total / (core_peak * utilization * SECONDS_PER_DAY),
        'days_on_this_slice': total / (len(devices) * generation.peak_bf16_per_device
                                       * utilization * SECONDS_PER_DAY)}
  return out

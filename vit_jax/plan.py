r"""Will it fit? A config's train and eval steps compiled for Cloud TPU slices, before renting one.

    python -m vit_jax.plan --config=configs/vit.py:l16,cifar10 --topology=v3-8 \
        [--topology=v5litepod-16 ...] [--json_out=plan.json] [--config.dtype=bfloat16 ...]

Compiles with libtpu on this machine (`pip install -e '.[tpu]'`; no TPU, no dataset) the very
steps `python -m vit_jax.main` would run on each slice (vit_jax.tpu_compile), and prints per
device the memory against the HBM, FLOPs, HBM bytes accessed, the compiler's estimate where valid
(a cost model) and the compile time; whole-run FLOPs and TPU-core-days at `--utilization`; when
the train step does not fit, the smallest change that fits, as flags. Slices: v2-8, v3-32, v4-N,
v5litepod-N, v5p-N, v6e-N (vit_jax.hardware.TPU_GENERATIONS). Each slice compiles in a process of
its own (tpu_compile.in_child). An unknown topology, a batch the devices do not divide, libtpu
missing or its compiler crashing in every attempt is one `Error:` line, exit 2 (vit_jax.cli).
"""
import json

from absl import flags
from ml_collections import config_flags

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import hardware
from vit_jax import logging_util
from vit_jax import plan_lib
from vit_jax import tpu_compile
from vit_jax.logging_util import gib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/vit.py:b16,cifar10.', lock_config=True)
_TOPOLOGY = flags.DEFINE_multi_string(
    'topology', None, 'Cloud TPU accelerator type, e.g. v3-8, v4-32, v5litepod-16 (repeatable).')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Write the plan (a list, one object per '
                                'topology) to this JSON file.')
_UTILIZATION = flags.DEFINE_float(
    'utilization', 0.5, 'Fraction of the bf16 peak assumed for the whole-run core-days.')
_EVAL = flags.DEFINE_bool('eval', True, 'Compile the eval step too.')
_SUGGEST = flags.DEFINE_bool('suggest', True, 'When the train step does not fit, search the '
                             'smallest change that does (compiles each candidate).')


def _memory_line(step: dict, hbm: int) -> str:
  if step.get('out_of_memory'):
    oom = step['out_of_memory']
    return (f'does not fit: the compiler needs {gib(oom["required_bytes"])} of '
            f'temporaries, {gib(oom["available_bytes"])} of HBM available '
            f'(RESOURCE_EXHAUSTED); state {gib(step["arguments_bytes"])}')
  return (f'state {gib(step["arguments_bytes"])} + temporaries '
          f'{gib(step["temporaries_bytes"])} = {gib(step["total_bytes"])} '
          f'of {gib(hbm)} HBM: {"fits" if step["fits"] else "DOES NOT FIT"}')


def _cost_line(step: dict, per_device_batch: int) -> str:
  if step['flops_per_device'] is None:
    return f'compiled in {step["compile_s"]:.0f} s'
  estimate = ('' if step['compiler_estimate_s'] is None else
              f'; compiler\'s estimate {step["compiler_estimate_s"]:.3g} s per step (a cost '
              'model, not a measurement)')
  return (f'{step["flops_per_device"]:.3g} FLOPs per device per step '
          f'({step["flops_per_device"] / per_device_batch:.3g} per image), '
          f'{step["bytes_accessed_per_device"]:.3g} HBM bytes accessed{estimate}; compiled in '
          f'{step["compile_s"]:.0f} s')


def describe(config, result: dict) -> str:
  """The printed plan of one slice."""
  model = config.model
  hbm, devices = result['hbm_bytes_per_device'], result['devices']
  lines = [
      f'{model.model_name} {config.pp.resolution}px, batch {config.batch} (eval '
      f'{config.batch_eval}), {config.dtype}, sharding {config.sharding}, accum_steps '
      f'{config.accum_steps}, remat {model.remat_policy}, scan_layers {model.scan_layers} on '
      f'{result["topology"]}: {devices} x {result["device_kind"]} ({result["hosts"]} host(s), '
      f'{gib(hbm)} HBM per device)']
  for name, batch in (('train', config.batch), ('eval', config.batch_eval)):  # Loops counted.
    step = result[name]
    if step is not None:
      lines.append(f'  {name} step: {_memory_line(step, hbm)}')
      lines.append(f'    {_cost_line(step, batch // devices)}')
  if not result['train']['fits']:
    lines.append('  Smallest change that fits (compiled): ' + (
        f'{result["suggestion"]} ({gib(result["suggested_train"]["total_bytes"])} '
        'per device)' if result['suggestion'] else 'none found among the candidates'))
  run = result.get('whole_run')
  if run:
    generation = result['device_kind']
    lines.append(
        f'  whole run ({result["total_steps"]:,} steps): {run["total_flops"]:.3g} FLOPs '
        f'({run["flops_per_image"]:.3g} per image) = {run["core_days"]:,.4g} {generation} '
        f'core-days at {run["utilization"]:.0%} of the bf16 peak ({run["days_on_this_slice"]:.2f} '
        'days on this slice)')
    lines.append(f'    {plan_lib.describe_flops_ratio(run)}')
  return '\n'.join(lines)


def main(argv):
  cli.check_no_arguments(argv)
  logging_util.quiet_libraries()
  if _CONFIG.value is None:
    raise cli.UserError('--config is required, e.g. --config=configs/vit.py:b16,cifar10.')
  if not _TOPOLOGY.value:
    raise cli.UserError('--topology is required, e.g. --topology=v3-8.')
  if not 0 < _UTILIZATION.value <= 1:
    raise cli.UserError(f'--utilization={_UTILIZATION.value} must be in (0, 1].')
  for name in _TOPOLOGY.value:
    hardware.tpu_slice(name)  # Every name checked before the first (slow) compile.
  config = _CONFIG.value.unlock()
  results = []
  for name in _TOPOLOGY.value:
    result = tpu_compile.in_child(plan_lib.plan, config, name, utilization=_UTILIZATION.value,
                                  with_eval=_EVAL.value, with_suggestion=_SUGGEST.value)
    print(describe(config, result), flush=True)
    results.append(result)
    if _JSON_OUT.value:  # After every slice: a long plan keeps what it has.
      checkpoint.write_atomically(_JSON_OUT.value, json.dumps(results, indent=1))


if __name__ == '__main__':
  cli.run(main)

r"""Benchmark the ViT forward pass or train step: images/s, TFLOP/s, MFU, compile time, memory.

    python -m vit_jax.benchmark                    # --preset=cpu: ViT-Ti_16, ViT-S_16 @224, batch 8
    python -m vit_jax.benchmark --model=ViT-B_16 --resolution=384 --batch=32 --mode=train \
        --dtype=bfloat16 --remat=full --scan --attention=fused --json_out=b16.json
    python -m vit_jax.benchmark --preset=gpu --mode=train      # B/16 and L/16 at 224 and 384
    python -m vit_jax.benchmark --model=ViT-L_16 --mode=train --find_max_batch
    python -m vit_jax.benchmark --compare_timm     # against timm: ViT-Ti/S_16, train + inference
    python -m vit_jax.benchmark --pipeline_config=configs/vit.py:b16,cifar10   # input pipeline

Prints one block per row and writes everything as JSON with --json_out. What each figure means
and how it is taken: `vit_jax.benchmark_lib`. Rows run in the order given; peak memory figures
are peaks over the whole process so far.
"""
import functools
import json
import sys
from typing import List, Sequence

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from vit_jax import benchmark_lib as lib
from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax.logging_util import gib

# Rows (model, resolution, batch per device) and defaults of each preset.
PRESETS = {
    'cpu': dict(rows=[('ViT-Ti_16', 224, 8), ('ViT-S_16', 224, 8)], dtype='float32', steps=5),
    'gpu': dict(rows=[('ViT-B_16', 224, 128), ('ViT-B_16', 384, 32), ('ViT-L_16', 224, 64),
                      ('ViT-L_16', 384, 16)], dtype='bfloat16', steps=20),
    # --compare_timm's default: the comparison of docs/PERFORMANCE.md (both modes).
    'compare': dict(rows=[('ViT-Ti_16', 224, 16), ('ViT-S_16', 224, 16)], dtype='float32',
                    steps=5),
    'tpu': dict(rows=[('ViT-B_16', 224, 64), ('ViT-B_16', 384, 16), ('ViT-L_16', 224, 32),
                      ('ViT-L_16', 384, 8)], dtype='bfloat16', steps=20),
}


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command's flags on `fv` (not at import: importing this module defines none)."""
  string = functools.partial(flags.DEFINE_string, flag_values=fv)
  integer = functools.partial(flags.DEFINE_integer, flag_values=fv)
  enum = functools.partial(flags.DEFINE_enum, flag_values=fv)
  boolean = functools.partial(flags.DEFINE_bool, flag_values=fv)
  string('model', None, 'Model name or alias; default: the preset\'s models.')
  integer('resolution', 224, 'Input resolution (with --model).')
  integer('batch', 8, 'Global batch, all devices (with --model).')
  enum('dtype', None, models.DTYPES, 'Compute dtype (params stay float32); default: the preset\'s.')
  enum('mode', None, lib.MODES,
       'Forward pass or jitted train step; default: inference, or both with --compare_timm.')
  integer('steps', None, 'Timed steps (after 1 warm-up); default: the preset\'s.')
  enum('remat', 'none', list(models.REMAT_POLICIES), 'Remat policy per block.')
  boolean('scan', False, 'nn.scan over the encoder blocks.')
  enum('attention', 'xla', list(models.ATTENTION_IMPLS), 'Attention implementation.')
  enum('sharding', 'replicate', list(sharding.STRATEGIES), 'Train state sharding.')
  enum('optimizer', 'sgd', list(optim.OPTIMIZERS), 'Train step optimizer.')
  integer('num_devices', None, 'Devices used (default: all).')
  integer('num_classes', 1000, 'Classifier head size.')
  flags.DEFINE_float('peak_flops', None, 'Peak FLOP/s per device for MFU (default: '
                     'vit_jax.hardware).', flag_values=fv)
  enum('preset', None, list(PRESETS),
       'Rows (model, resolution, batch/device); default cpu without --model.')
  boolean('with_pipeline', False, 'Also time the host input pipeline per row.')
  config_flags.DEFINE_config_file(
      'pipeline_config', None, 'Time only the host input pipeline of this training config, e.g. '
      'configs/vit.py:b16,cifar10 (overrides: --pipeline_config.batch=...).', flag_values=fv)
  integer('pipeline_steps', 20, 'Batches timed by --with_pipeline and --pipeline_config.',
          lower_bound=1)
  integer('pipeline_shuffle_buffer', None,
          'Default: the run config\'s; only changes the untimed start-up.')
  string('data_dir', None, 'fashion_mnist location for --with_pipeline.')
  boolean('find_max_batch', False,
          'Search the largest batch per device that fits, instead of timing.')
  enum('max_batch_method', 'analysis', ['analysis', 'run'],
       'analysis: compile only, XLA memory vs the limit; run: one step, OOM = no.')
  flags.DEFINE_float('memory_limit_gb', None, 'Limit per device in GiB (default: '
                     'hardware.memory_budget, as for training).', flag_values=fv)
  integer('max_batch_cap', 4096, 'Largest batch per device tried.')
  integer('max_batch_granularity', 1, 'Stop bisecting when the fit and the failure are this close.')
  boolean('compile_only', False, 'Lower and compile only (compile time, XLA memory); run nothing.')
  boolean('compare_timm', False,
          "Time timm's equivalent model in the same process, alternating pairs, and print the "
          "ratio (vit_jax.compare_timm; needs '.[compare]'); default rows: the compare preset.")
  integer('pairs', 3, 'Alternating (ours, timm) timing pairs of --compare_timm.')
  boolean('timm_compile', False, 'torch.compile the timm model (--compare_timm).')
  string('json_out', None, 'Write every figure here as JSON.')


def specs_from_flags(fv: flags.FlagValues) -> List[lib.Spec]:
  if fv.model and fv.preset:
    raise app.UsageError('--model and --preset exclude each other.')
  preset = PRESETS[fv.preset or ('compare' if fv.compare_timm else 'cpu')]
  if fv.model:
    rows = [(fv.model, fv.resolution, fv.batch)]
    dtype, steps = fv.dtype or 'float32', fv.steps or lib.DEFAULT_STEPS
  else:
    n = fv.num_devices or jax.device_count()
    rows = [(m, r, b * n) for m, r, b in preset['rows']]
    dtype, steps = fv.dtype or preset['dtype'], fv.steps or preset['steps']
  modes = [fv.mode] if fv.mode else (['train', 'inference'] if fv.compare_timm
                                      else ['inference'])
  return [lib.Spec(model=m, resolution=r, batch=b, mode=mode, dtype=dtype,
                   attention_impl=fv.attention, remat_policy=fv.remat, scan_layers=fv.scan,
                   sharding=fv.sharding, optimizer=fv.optimizer, num_devices=fv.num_devices,
                   num_classes=fv.num_classes, steps=steps)
          for m, r, b in rows for mode in modes]


def format_row(row: dict) -> str:
  switches = [row['dtype'], f'attention={row["attention_impl"]}',
              f'remat={row["remat_policy"]}', f'scan={row["scan_layers"]}']
  if row['mode'] == 'train':
    switches += [f'sharding={row["sharding"]}', f'optimizer={row["optimizer"]}']
  xla = row['xla_memory']
  lines = [
      f'{row["model"]} @{row["resolution"]} {row["mode"]} ({", ".join(switches)}), batch '
      f'{row["batch"]} ({row["batch_per_device"]}/device x {row["num_devices"]} '
      f'{row["device_kind"]})']
  if row['images_per_s'] is None:
    lines.append('  images/s n/a (compile only)   achieved TFLOP/s n/a   MFU n/a   '
                 f'({row["flops_per_image"] / 1e9:.3g} GFLOP/image)')
  else:
    mfu = ('n/a (peak FLOP/s unknown; --peak_flops)' if row['mfu'] is None
           else f'{100 * row["mfu"]:.3g}%')
    lines += [
        f'  images/s {row["images_per_s"]:.1f}   step {1e3 * row["step_time_s"]:.3g} ms '
        f'(median of {row["steps"]})',
        f'  achieved TFLOP/s {row["achieved_tflops"]:.3g}   MFU {mfu}   '
        f'({row["flops_per_image"] / 1e9:.3g} GFLOP/image)']
  lines += [
      f'  lower {row["lower_s"]:.2f} s   compile {row["compile_s"]:.2f} s',
      f'  peak memory {gib(row["peak_memory_bytes"])} ({row["peak_memory_source"]})   '
      f'XLA program {gib(xla and xla["total"])}/device '
      f'(temp {gib(xla and xla["temp"])})',
  ]
  return '\n'.join(lines + _remat_note(row))


def _remat_note(result: dict) -> List[str]:
  caveat = models.remat_caveat(result['backend'], result['remat_policy'], result['scan_layers'])
  return [f'  note: {caveat}; add --scan'] if caveat else []


def format_max_batch(result: dict) -> str:
  failure = result['smallest_failure_per_device']
  slack = failure - result['max_batch_per_device'] - 1 if failure else 0
  text = (f'{result["model"]} @{result["resolution"]} {result["mode"]} {result["dtype"]} '
          f'remat={result["remat_policy"]} scan={result["scan_layers"]} '
          f'sharding={result["sharding"]} x{result["num_devices"]}: max batch/device '
          f'{result["max_batch_per_device"]}{"+ (cap)" if result["capped"] else ""}'
          f'{f" (up to +{slack} more may fit)" if slack else ""} '
          f'[{result["method"]}, limit {gib(result["memory_limit_bytes"])} '
          f'({result["memory_limit_source"]})]')
  return '\n'.join([text] + _remat_note(result))


def _time_pipelines(specs: Sequence[lib.Spec], rows: Sequence[dict], fv: flags.FlagValues):
  for spec, row in zip(specs, rows):
    config = lib.fashion_mnist_config(spec, data_dir=fv.data_dir,
                                      shuffle_buffer=fv.pipeline_shuffle_buffer)
    row['pipeline_images_per_s'] = lib.pipeline_images_per_s(config, fv.pipeline_steps)
    model_speed = 'n/a' if row['images_per_s'] is None else f'{row["images_per_s"]:.1f}'
    print(f'{row["model"]} @{row["resolution"]} batch {row["batch"]}: pipeline images/s '
          f'{row["pipeline_images_per_s"]:.1f} (host, fashion_mnist; model images/s '
          f'{model_speed})', flush=True)


def _time_config_pipeline(config, steps: int) -> dict:
  """--pipeline_config: the host input pipeline of a training config, alone."""
  images_per_s = lib.pipeline_images_per_s(config, steps)
  local_batch = config.batch // jax.process_count()
  print(f'{config.dataset} {config.train_split} @ {config.pp.resolution}px, pp.train='
        f'{config.pp.train}, local batch {local_batch}: {images_per_s:,.0f} images/s', flush=True)
  return {'dataset': config.dataset, 'train_split': config.train_split, 'steps': steps,
          'resolution': config.pp.resolution, 'pp_train': config.pp.train,
          'local_batch': local_batch, 'images_per_s': images_per_s}


def _compare_timm(specs: Sequence[lib.Spec], fv: flags.FlagValues) -> List[dict]:
  from vit_jax import compare_timm  # pylint: disable=g-import-not-at-top
  results = []
  for spec in specs:
    try:
      result = compare_timm.compare(spec, pairs=fv.pairs, compile_timm=fv.timm_compile)
    except ImportError as e:
      raise app.UsageError(str(e)) from e
    print(compare_timm.format_result(result), flush=True)
    results.append(result)
  return results


def run(fv: flags.FlagValues, command_line: Sequence[str] = ()) -> dict:
  """Runs the command for parsed flags `fv`; prints as it goes, returns what --json_out gets
  (`command_line`, the arguments given, is recorded there)."""
  specs = specs_from_flags(fv)
  info = lib.machine()
  print(f'{info["backend"]}: {info["device_count"]} x {info["device_kind"]}; host '
        f'{info["host_cpu"]} ({info["host_cpu_count"]} CPUs, {info["host_vector_isa"] or "?"}); '
        f'jax {info["jax"]}', flush=True)
  out = {'machine': info, 'argv': list(command_line)}
  if fv.pipeline_config:
    out['pipeline'] = _time_config_pipeline(fv.pipeline_config, fv.pipeline_steps)
  elif fv.compare_timm:
    out['compare_timm'] = _compare_timm(specs, fv)
  elif fv.find_max_batch:
    limit = fv.memory_limit_gb and int(fv.memory_limit_gb * 2**30)
    out['max_batch'] = []
    for spec in specs:
      result = lib.find_max_batch(spec, method=fv.max_batch_method, memory_limit_bytes=limit,
                                  cap=fv.max_batch_cap, granularity=fv.max_batch_granularity)
      print(format_max_batch(result), flush=True)
      out['max_batch'].append(result)
  else:
    out['results'] = []
    for spec in specs:
      row = lib.run(spec, peak_flops=fv.peak_flops, compile_only=fv.compile_only)
      print(format_row(row), flush=True)
      out['results'].append(row)
    if fv.with_pipeline:  # After all rows, so that the host peak RSS above excludes it.
      _time_pipelines(specs, out['results'], fv)
  if fv.json_out:
    checkpoint.write_atomically(fv.json_out, json.dumps(out, indent=2))
    print(f'Wrote {fv.json_out}')
  return out


def main(argv: Sequence[str]) -> None:
  cli.check_no_arguments(argv)
  run(flags.FLAGS, sys.argv[1:])


if __name__ == '__main__':
  define_flags()
  cli.run(main)

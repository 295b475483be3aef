"""Generates docs/TPU.md from `python -m vit_jax.plan`'s results (vit_jax.plan_lib.plan, the same
objects as its --json_out), kept in docs/tpu_plan.json.

    python scripts/tpu_table.py            # compiles the missing cells, then writes docs/TPU.md
    python scripts/tpu_table.py --render   # only writes docs/TPU.md from docs/tpu_plan.json

Cells are compiled in the order of CELLS and saved after each one, so an interrupted run goes on
where it stopped. Every config is compiled with `model.scan_layers=True` (one block compiled
instead of all: minutes instead of hours on a small machine; the memory is within a few percent of
the unrolled program's). Largest batch per chip: the largest per-device train batch (a power of
two, then bisected) whose step the compiler fits, without remat or accumulation.
"""
import importlib.util
import json
import os
import sys

import jax

from vit_jax import checkpoint
from vit_jax import hardware
from vit_jax import plan_lib
from vit_jax import tpu_compile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = os.path.join(_ROOT, 'docs', 'tpu_plan.json')
DOC = os.path.join(_ROOT, 'docs', 'TPU.md')
MODELS = ('ViT-Ti_16', 'ViT-S_32', 'ViT-S_16', 'ViT-B_32', 'ViT-B_16', 'R26+ViT-S_32',
          'R50+ViT-B_16', 'ViT-L_32', 'ViT-L_16', 'ViT-H_14')
# recipe -> (config file, dataset): official fine-tuning (384px, batch 512), pre-training (224px,
# batch 4096).
RECIPES = {'fine-tune 384px, batch 512': ('configs/vit.py', 'imagenet2012'),
           'pre-train 224px, batch 4096': ('configs/pretrain.py', 'imagenet2012')}
SLICES = ('v3-8', 'v4-8', 'v5litepod-8', 'v5p-8', 'v6e-8', 'v4-32')
CELLS = [(m, r, s) for m in MODELS for r in RECIPES for s in SLICES]
# Largest batch per chip: (model, resolution) x generation (its 8-chip-or-core slice).
MAX_BATCH_MODELS = (('ViT-B_16', 224), ('ViT-B_16', 384), ('ViT-L_16', 224), ('ViT-L_16', 384))
MAX_BATCH_SLICES = ('v3-8', 'v4-8', 'v5litepod-8')
MAX_CANDIDATES = 3


def recipe_config(model: str, recipe: str):
  path, dataset = RECIPES[recipe]
  spec = importlib.util.spec_from_file_location('recipe', os.path.join(_ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'{model},{dataset}')
  config.model.scan_layers = True
  return config


def _load() -> dict:
  if not os.path.exists(JSON):
    return {'cells': [], 'max_batch': []}
  with open(JSON) as f:
    return json.load(f)


def _save(results: dict) -> None:
  # Atomic: the file holds every cell compiled so far (hours of compiles), and is rewritten after
  # each one; an interrupted write must leave the previous version.
  checkpoint.write_atomically(JSON, json.dumps(results, indent=1))


def compile_cells(results: dict) -> None:
  done = {(c['model'], c['recipe'], c['topology']) for c in results['cells']}
  for model, recipe, topology in CELLS:
    if (model, recipe, topology) in done:
      continue
    result = plan_lib.plan(recipe_config(model, recipe), topology, utilization=0.5,
                           with_eval=False, max_candidates=MAX_CANDIDATES)
    results['cells'].append({'model': model, 'recipe': recipe, **result})
    _save(results)
    print(model, recipe, topology, result['train']['fits'], result['suggestion'], flush=True)


def _fits(model: str, resolution: int, topology: str, per_device: int) -> bool:
  config = recipe_config(model, 'fine-tune 384px, batch 512')
  config.pp.resolution, config.model.remat_policy, config.accum_steps = resolution, 'none', 1
  tpu = hardware.tpu_slice(topology)
  config.batch = config.batch_eval = per_device * tpu.devices
  return tpu_compile.compile_train_and_eval(config, tpu, with_eval=False)['train'].fits


def max_batch(model: str, resolution: int, topology: str) -> int:
  """The largest per-device batch that fits: doubling from 8, then bisection."""
  good, bad = 0, 8
  while _fits(model, resolution, topology, bad):
    good, bad = bad, bad * 2
  while bad - good > 1:
    mid = (good + bad) // 2
    good, bad = (mid, bad) if _fits(model, resolution, topology, mid) else (good, mid)
  return good


def compile_max_batch(results: dict) -> None:
  done = {(r['model'], r['resolution'], r['topology']) for r in results['max_batch']}
  for (model, resolution), topology in [(m, s) for m in MAX_BATCH_MODELS
                                        for s in MAX_BATCH_SLICES]:
    if (model, resolution, topology) not in done:
      best = max_batch(model, resolution, topology)
      results['max_batch'].append({'model': model, 'resolution': resolution,
                                   'topology': topology, 'max_batch_per_device': best})
      _save(results)


def _cell(result: dict) -> str:
  train = result['train']
  gib = lambda b: f'{b / 2**30:.1f}'
  if train['fits']:
    text = f'yes, {gib(train["total_bytes"])} GiB'
  else:
    fix = result['suggestion']
    text = f'no, {gib(train["total_bytes"])} GiB' + (
        f'; `{fix}`: {gib(result["suggested_train"]["total_bytes"])} GiB' if fix else
        '; no fix among the first candidates')
  run = result.get('whole_run')
  flops = f'{run["flops_per_image"] * result["batch"]:.2e}' if run else 'n/a'
  return f'{text}; {flops} FLOP/step; {train["compile_s"]:.0f} s'


def render(results: dict) -> str:
  cells = {(c['model'], c['recipe'], c['topology']): c for c in results['cells']}
  lines = ['| model | recipe | ' + ' | '.join(SLICES) + ' |', '|---|---|' + '---|' * len(SLICES)]
  missing = []
  for model in MODELS:
    for recipe in RECIPES:
      row = []
      for topology in SLICES:
        result = cells.get((model, recipe, topology))
        row.append(_cell(result) if result else 'not compiled yet')
        if result is None:
          missing.append(f'{model} {recipe} on {topology}')
      lines.append(f'| {model} | {recipe} | ' + ' | '.join(row) + ' |')
  sizes = {(r['model'], r['resolution'], r['topology']): r['max_batch_per_device']
           for r in results['max_batch']}
  batch = ['| model | resolution | ' + ' | '.join(MAX_BATCH_SLICES) + ' |',
           '|---|---|' + '---|' * len(MAX_BATCH_SLICES)]
  for model, resolution in MAX_BATCH_MODELS:
    row = [str(sizes.get((model, resolution, s), 'not compiled yet')) for s in MAX_BATCH_SLICES]
    batch.append(f'| {model} | {resolution} | ' + ' | '.join(row) + ' |')
  return '\n'.join(lines), '\n'.join(batch), missing


TEMPLATE = """# Cloud TPU: will it fit?

Generated by `python scripts/tpu_table.py` from `python -m vit_jax.plan`'s results
(docs/tpu_plan.json); do not edit by hand. Every cell is the shipped config compiled by the TPU
compiler (libtpu {libtpu}) for that slice on a CPU-only machine, ahead of time, with
`--config.model.scan_layers=True` (one encoder block compiled instead of all of them: the
compile time below is the scanned program's). Recipes as shipped: float32 compute, replicated
state, no remat, no accumulation, ImageNet's 1000 classes. Check your own config and slice with
`python -m vit_jax.plan --config=... --topology=...` (README, "Will it fit?").

Each cell: fits as configured?, the train step's memory per device (XLA's buffers: state,
temporaries, outputs); when it does not fit, the smallest change found that fits (compiled) and
its memory; FLOPs per step of the whole slice (the fitting step's; XLA's count, loops counted
once per pass); compile time of the train step on this machine (2 shared CPU cores, so slow).

{table}

{missing} of {cells} cells are not compiled yet ("not compiled yet" above; the script goes on
from there).

## Largest batch per device without remat or accumulation

The largest per-device train batch whose step the TPU compiler fits (float32 compute, replicated
state, SGD: the fine-tuning recipe's step; scanned layers), per device (a v3 core; a v4 or v5e
chip):

{max_batch}

## Restart without recompiling

Training runs keep their compiled programs in JAX's persistent compilation cache,
`WORKDIR/compilation_cache` by default (vit_jax.compilation_cache; `config.compilation_cache_dir`
moves it or, with '', turns it off). Start to first train step of a fresh process
(`scripts/restart_time.py`: `train_loop.prepare` and one step, each start in a new workdir), on
this project's 2-core CPU machine while other jobs loaded it (load average ~12, so the figures
are noisy):

| run | cache off | empty cache (fills it) | filled cache |
|---|---|---|---|
| ViT-S/16, 224px, batch 8, CPU | 262 s | 222 s | 149 s |

The warm start skips XLA's compilation of the train and eval steps; what remains is Python,
TensorFlow and the input pipeline starting, initialisation and the step itself. On TPU pods a
large model's compile takes minutes (ViT-B/16 for a v3-32: 685 s on this machine's compiler).
"""


def write_doc(results: dict) -> None:
  table, batch, missing = render(results)
  text = TEMPLATE.format(table=table, max_batch=batch, libtpu=_libtpu_version(),
                         missing=len(missing), cells=len(CELLS))
  with open(DOC, 'w') as f:
    f.write(text)


def _libtpu_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version('libtpu')


def main(argv):
  jax.config.update('jax_platforms', 'cpu')
  results = _load()
  if '--render' not in argv:
    compile_cells(results)
    compile_max_batch(results)
  write_doc(results)


if __name__ == '__main__':
  main(sys.argv[1:])

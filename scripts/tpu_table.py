"""Generates docs/TPU.md from `python -m vit_jax.plan`'s results (vit_jax.plan_lib.plan, the same
objects as its --json_out), kept in docs/tpu_plan.json.

    python scripts/tpu_table.py            # compiles the missing cells, then writes docs/TPU.md
    python scripts/tpu_table.py --render   # only writes docs/TPU.md from docs/tpu_plan.json

Cells are compiled in the order of CELLS, each in a child process (as is each probe of the
largest-batch search), and saved after each one, so an interrupted run goes on where it stopped. A
child killed by a crash signal (libtpu 0.0.42.1 overflows a compiler thread's stack on the ResNet
hybrids for v6e-8, in some attempts only) is retried up to CRASH_ATTEMPTS times, then recorded as a
compiler crash, and the run goes on; a crash recorded with fewer attempts is retried by the next
run. Configs are compiled as shipped (unrolled layers), except models deeper than SCAN_ABOVE_LAYERS
blocks, compiled with `model.scan_layers=True` (one block compiled instead of all: minutes instead
of hours on a small machine). Without remat a scanned step can need much more memory on TPU than
the unrolled one (ViT-B/16, 384px, 16 images per v3 core: 15.4 GiB of temporaries scanned, 6.4 GiB
unrolled), so those cells are marked. Largest batch per chip: the largest per-device train batch
whose step (unrolled, without remat or accumulation) the compiler fits without recomputing work
(max_batch).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import jax

from vit_jax import benchmark_lib
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
# Smaller models first (their compiles take a minute or two; ViT-H/14's take up to an hour).
CELLS = [(m, r, s) for m in MODELS for r in RECIPES for s in SLICES]
# Largest batch per chip: (model, resolution) x generation (its 8-chip-or-core slice).
MAX_BATCH_MODELS = (('ViT-B_16', 224), ('ViT-B_16', 384), ('ViT-L_16', 224), ('ViT-L_16', 384))
MAX_BATCH_SLICES = ('v3-8', 'v4-8', 'v5litepod-8')
# Candidate changes compiled for an unrolled step that does not fit (each compile takes minutes).
MAX_CANDIDATES = 3
SCAN_ABOVE_LAYERS = 12
# FLOPs per image above the smallest batch's that count as recomputation.
RECOMPUTE_TOLERANCE = 0.01
# The search stops when the largest fit and the smallest failure are this close (compiles are slow).
RELATIVE_GRANULARITY = 0.05


def recipe_config(model: str, recipe: str):
  path, dataset = RECIPES[recipe]
  spec = importlib.util.spec_from_file_location('recipe', os.path.join(_ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'{model},{dataset}')
  layers = config.model.transformer and config.model.transformer.num_layers
  config.model.scan_layers = bool(layers and layers > SCAN_ABOVE_LAYERS)
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


def compile_cell(model: str, recipe: str, topology: str) -> dict:
  config = recipe_config(model, recipe)
  # A scanned step that does not fit fails in seconds, so all of plan's candidates are cheap.
  candidates = plan_lib.MAX_CANDIDATES if config.model.scan_layers else MAX_CANDIDATES
  result = plan_lib.plan(config, topology, utilization=0.5, with_eval=False,
                         max_candidates=candidates)
  return {'model': model, 'recipe': recipe, 'scan_layers': config.model.scan_layers, **result}


# Compiles of a cell before its crash is recorded, as `python -m vit_jax.plan` tries (libtpu's
# stack overflow on the hybrids for v6e is intermittent: 5 of 6 identical BiT-R26x1 compiles
# crashed, the other compiled).
CRASH_ATTEMPTS = tpu_compile.CRASH_ATTEMPTS


def _run_child(*args: str) -> dict:
  """This script with ARGS (`--cell ...` or `--probe ...`) in a child process, one compile per
  process: host memory grows from compile to compile in one process (a ViT-L/16 batch search
  reached 24 GB and the OOM killer). The child's last stdout line is the result's JSON; a
  compiler that kills its process comes back as {'compiler_crash': signal name}."""
  child = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, check=False,
                         text=True)
  if -child.returncode in tpu_compile.CRASH_SIGNALS:
    return {'compiler_crash': signal.Signals(-child.returncode).name}
  if child.returncode:  # Including SIGKILL / SIGTERM: this machine's OOM killer or a user.
    raise RuntimeError(f'Compiling {" ".join(args[1:])} failed (exit {child.returncode}); its '
                       'log (stderr) is above.')
  return json.loads(child.stdout.strip().splitlines()[-1])


def _cell_in_child(model: str, recipe: str, topology: str) -> dict:
  for _ in range(CRASH_ATTEMPTS):
    result = _run_child('--cell', model, recipe, topology)
    if 'compiler_crash' not in result:
      return result
  return {'model': model, 'recipe': recipe, 'topology': topology, **result,
          'attempts': CRASH_ATTEMPTS}


def _to_compile(cell: dict | None) -> bool:
  """Not compiled yet, or crashed in fewer than CRASH_ATTEMPTS attempts (older runs tried once)."""
  return cell is None or ('compiler_crash' in cell and cell.get('attempts', 1) < CRASH_ATTEMPTS)


def compile_cells(results: dict) -> None:
  index = {(c['model'], c['recipe'], c['topology']): i for i, c in enumerate(results['cells'])}
  for key in CELLS:
    i = index.get(key)
    if not _to_compile(None if i is None else results['cells'][i]):
      continue
    result = _cell_in_child(*key)
    if i is None:
      results['cells'].append(result)
    else:
      results['cells'][i] = result
    _save(results)
    print(*key, result.get('compiler_crash') or result['train']['fits'], result.get('suggestion'),
          flush=True)


def _train_report(model: str, resolution: int, topology: str, per_device: int):
  """The train step's tpu_compile.StepReport (compiled without its FLOPs counted)."""
  config = recipe_config(model, 'fine-tune 384px, batch 512')
  config.pp.resolution, config.model.remat_policy, config.accum_steps = resolution, 'none', 1
  config.model.scan_layers = False
  tpu = hardware.tpu_slice(topology)
  config.batch = config.batch_eval = per_device * tpu.devices
  return tpu_compile.compile_train_and_eval(config, tpu, with_eval=False,
                                            count_cost=False)['train']


def _train_report_in_child(model: str, resolution: int, topology: str, per_device: int):
  result = _run_child('--probe', model, str(resolution), topology, str(per_device))
  if 'compiler_crash' in result:
    raise RuntimeError(f'The compiler crashed ({result["compiler_crash"]}) on {model}, '
                       f'{resolution}px, {per_device} per device on {topology}.')
  return tpu_compile.StepReport(**result)


def max_batch(model: str, resolution: int, topology: str, start: int = 4) -> dict:
  """The largest per-device batch whose train step the compiler fits without recomputing:
  XLA:TPU rematerialises on its own to fit a large unrolled step into HBM (ViT-B/16, 224px, v3:
  330 images per core fit in float32), which the step's FLOPs per image show. A probe fits when
  it compiles within the HBM and its FLOPs per image are within RECOMPUTE_TOLERANCE of the first
  probe's (benchmark_lib.largest_fitting on the temporaries: their limit is the compiler's
  available HBM once an out-of-memory error gave it, else the documented HBM less the state).
  Also returned: the largest batch probed that fits with recomputation (a lower bound). A
  `start` above 4 (a guess, which saves probes of slow compiles) still probes 4 first: the
  FLOPs per image that count as not recomputing."""
  hbm = hardware.tpu_slice(topology).generation.hbm_bytes_per_device
  available, reports = [], {}
  per_image = lambda b: reports[b].flops_per_device / b

  def probe(per_device: int) -> tuple:
    report = reports[per_device] = _train_report_in_child(model, resolution, topology, per_device)
    first = min(reports)
    fits = report.fits and per_image(per_device) <= (1 + RECOMPUTE_TOLERANCE) * per_image(first)
    print(f'  {model} {resolution}px {topology}: {per_device} per device: compiles within HBM '
          f'{report.fits}, without recomputing {fits}', flush=True)
    if report.out_of_memory and report.out_of_memory['available_bytes']:
      available.append(report.out_of_memory['available_bytes'])
    limit = available[-1] if available else hbm - report.arguments_bytes
    return fits, report.temporaries_bytes, limit

  if start > 4:
    probe(4)
  best, failure = benchmark_lib.largest_fitting(probe, start=start, cap=4096,
                                                relative_granularity=RELATIVE_GRANULARITY)
  recomputing = max((b for b, r in reports.items() if r.fits), default=0)
  return {'max_batch_per_device': best, 'smallest_failure': failure,
          'largest_fitting_with_recompute': recomputing,
          'recompute_flops_ratio': recomputing and per_image(recomputing) / per_image(min(reports))}


def compile_max_batch(results: dict) -> None:
  done = {(r['model'], r['resolution'], r['topology']) for r in results['max_batch']}
  for (model, resolution), topology in [(m, s) for m in MAX_BATCH_MODELS
                                        for s in MAX_BATCH_SLICES]:
    if (model, resolution, topology) not in done:
      results['max_batch'].append({'model': model, 'resolution': resolution,
                                   'topology': topology, **max_batch(model, resolution, topology)})
      _save(results)


def _cell(result: dict) -> str:
  if 'compiler_crash' in result:
    attempts = result.get('attempts', 1)
    plural = 's' if attempts > 1 else ''
    return f'compiler crashed ({result["compiler_crash"]}; {attempts} attempt{plural})'
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
  ratio, kind = plan_lib.flops_ratio(run) if run else (None, None)
  if kind:
    flops += f' ({ratio:.2f}x the analytic count' + (
        ': the count misses work)' if kind == 'undercount' else ')')
  scanned = ' (scanned)' if result['scan_layers'] else ''
  shown = result.get('suggested_train') or train  # The step a user would run.
  return f'{text}{scanned}; {flops} FLOP/step; {shown["compile_s"]:.0f} s'


def _max_batch_cell(result: dict) -> str:
  best, more = result['max_batch_per_device'], result['largest_fitting_with_recompute']
  failure = result.get('smallest_failure')
  text = f'{best}' if failure in (None, best + 1) else f'{best}-{failure - 1}'
  if more <= best:
    return text
  return f'{text} ({more} at {result["recompute_flops_ratio"]:.2f}x FLOPs)'


def render(results: dict) -> tuple:
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
  sizes = {(r['model'], r['resolution'], r['topology']): _max_batch_cell(r)
           for r in results['max_batch']}
  batch = ['| model | resolution | ' + ' | '.join(MAX_BATCH_SLICES) + ' |',
           '|---|---|' + '---|' * len(MAX_BATCH_SLICES)]
  for model, resolution in MAX_BATCH_MODELS:
    row = [str(sizes.get((model, resolution, s), 'not compiled yet')) for s in MAX_BATCH_SLICES]
    batch.append(f'| {model} | {resolution} | ' + ' | '.join(row) + ' |')
  return '\n'.join(lines), '\n'.join(batch), missing


TEMPLATE = """# Cloud TPU: will it fit?

Generated by `python scripts/tpu_table.py` from `python -m vit_jax.plan`'s results
(docs/tpu_plan.json); do not edit by hand. Every cell is a shipped recipe compiled by the TPU
compiler (libtpu {libtpu}) for that slice, ahead of time, on a CPU-only machine: float32 compute,
replicated state, no remat, no accumulation, unrolled layers, ImageNet's 1000 classes (ViT-H/14
fine-tunes at 378px: the recipe's 384px in whole 14px patches). Check your
own config and slice with `python -m vit_jax.plan --config=... --topology=...` (README, "Will it
fit?").

Cells marked "(scanned)" are the exception: models deeper than {scan_above} blocks are compiled
with `--config.model.scan_layers=True`, one block instead of all of them (minutes instead of
hours here). Without remat a scanned step can need much more memory on TPU than the unrolled one
(ViT-B/16, 384px, 16 images per v3 core: 15.4 GiB of temporaries scanned, 6.4 GiB unrolled), so
a scanned cell that does not fit may fit unrolled.

Each cell gives:
- fits as configured?, and the train step's memory per device (XLA's buffers: state,
  temporaries, outputs);
- when it does not fit, the smallest change found that fits (compiled), and its memory;
- FLOPs per step of the whole slice (the fitting step's; XLA's count, each loop iteration
  counted, the compiler's own windowed-einsum loops of FSDP included), marked when over
  {recompute}x vit_jax.flops' forward + backward count: the compiled step then does more work
  per image, recomputing to fit the HBM or, with dropout (the pre-training recipe), drawing its
  random bits (ViT-Ti/16 at 224px: 1.18x with dropout 0.1, 1.01x without); under
  {undercount}x, the count misses work that the matmuls alone need, and the analytic count is
  the better figure;
- the compile time on this machine (2 shared CPU cores, so slow) of the train step shown: the
  change's where the configured step does not fit.
"compiler crashed (SIGSEGV; N attempts)": this libtpu's compiler killed its process on that cell
in each of N attempts, each in a process of its own (the script tries up to {crash_attempts}
times). On the ResNet hybrids for v6e it overflows a compiler thread's stack (in
`MigrateInstructionUsers`), in some attempts only: of six identical compiles of BiT-R26x1's eval
step here, one went through. `python -m vit_jax.plan` tries as often, then says so in an `Error:`
line. On a TPU VM the same libtpu presumably does the same (not verified there): run a job again
when its compile crashes.

{table}

{completeness}

## Largest batch per device without remat or accumulation

The largest train batch per device (a v3 core; a v4 or v5e chip) whose step the TPU compiler fits
without recomputation: the fine-tuning recipe's step (SGD with momentum), float32 compute,
replicated state, unrolled layers.
- XLA:TPU rematerialises by itself to fit a larger unrolled step, which shows as more FLOPs per
  image. So a batch counts only if its FLOPs per image are within 1% of the smallest batch's.
- In brackets: the largest batch probed that the compiler fits with recomputation, and its FLOPs
  per image over the smallest batch's (a slower step per image; not searched further, so more
  may fit).
- A range: the search stopped within {granularity:.0%} (the lower end fits, one past the upper
  end does not).

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
  crashed = sum('compiler_crash' in c for c in results['cells'])
  retried = sum(_to_compile(c) for c in results['cells'])
  completeness = (f'{len(missing)} of {len(CELLS)} cells are not compiled yet ("not compiled yet" '
                  'above; the script goes on from there).' if missing
                  else f'All {len(CELLS)} cells are compiled; the compiler crashed on {crashed}.')
  if retried:
    completeness += (f' The script tries again where it crashed in fewer than {CRASH_ATTEMPTS} '
                     f'attempts ({retried}).')
  text = TEMPLATE.format(table=table, max_batch=batch, libtpu=_libtpu_version(),
                         completeness=completeness, crash_attempts=CRASH_ATTEMPTS,
                         scan_above=SCAN_ABOVE_LAYERS, recompute=plan_lib.RECOMPUTE_RATIO,
                         undercount=plan_lib.UNDERCOUNT_RATIO,
                         granularity=RELATIVE_GRANULARITY)
  checkpoint.write_atomically(DOC, text)


def _libtpu_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version('libtpu')


def main(argv):
  jax.config.update('jax_platforms', 'cpu')
  if argv[:1] == ['--cell']:
    print(json.dumps(compile_cell(*argv[1:4])), flush=True)
    return
  if argv[:1] == ['--probe']:
    model, resolution, topology, per_device = argv[1:5]
    report = _train_report(model, int(resolution), topology, int(per_device))
    print(json.dumps(report.to_json()), flush=True)
    return
  if argv not in ([], ['--render']):
    sys.exit(__doc__)
  results = _load()
  if not argv:
    compile_cells(results)
    compile_max_batch(results)
  write_doc(results)


if __name__ == '__main__':
  main(sys.argv[1:])

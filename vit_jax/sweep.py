r"""The paper's fine-tuning protocol (appendix B.1.1) as one command: sweep the learning rate.

    python -m vit_jax.sweep --config=configs/vit.py:b16,cifar10 --workdir=/tmp/sweep

Each of --base_lrs fine-tunes, one after another, in WORKDIR/lr_<base_lr>; the best minival top-1
(`eval_top1` at the last step; a tie goes to the smaller rate) is chosen and its `test_top1`
reported, printed and written to WORKDIR/sweep.md and sweep.json. A rerun resumes: finished runs
are reused (workdir.final_result), an interrupted one resumes from its checkpoint. A run whose loss
turns non-finite is listed as diverged, never chosen. Config fields are overridden as with
`vit_jax.main`; a single process only.
"""
import json
import math
import os
from typing import Optional, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import logging_util
from vit_jax import train_loop
from vit_jax import workdir as workdir_lib


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defined by the program only, so that importing this module adds no flags elsewhere."""
  config_flags.DEFINE_config_file('config', None, 'Fine-tuning config, e.g. '
                                  'configs/vit.py:b16,cifar10.', lock_config=True, flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Parent of the runs\' workdirs and the results.',
                      flag_values=fv)
  flags.DEFINE_list('base_lrs', ['0.001', '0.003', '0.01', '0.03'],
                    'Base learning rates to fine-tune with (the paper\'s by default).',
                    flag_values=fv)


def parse_base_lrs(values: Sequence[str]) -> list[float]:
  """'0.001', ... -> sorted distinct positive floats; raises UserError naming a bad value."""
  lrs = []
  for value in values:
    try:
      lr = float(value)
    except ValueError:
      lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
      raise cli.UserError(f'--base_lrs: {value!r} is not a positive number.')
    lrs.append(lr)
  if not lrs or len(set(lrs)) != len(lrs):
    raise cli.UserError(f'--base_lrs={",".join(values)}: give distinct learning rates.')
  return sorted(lrs)


def run_workdir(workdir: str, base_lr: float) -> str:
  return os.path.join(workdir, f'lr_{base_lr:g}')


def fine_tune(config, base_lr: float, workdir: str) -> dict:
  """{'eval_top1', 'test_top1'} of the run with `base_lr`; {} when its loss became non-finite."""
  config = config.copy_and_resolve_references()
  config.base_lr = base_lr
  directory = run_workdir(workdir, base_lr)
  result = workdir_lib.final_result(directory, config.total_steps)
  if result is not None:
    logging.info('base_lr=%g: reusing the finished run in %s.', base_lr, directory)
    return result
  logging.info('base_lr=%g: fine-tuning in %s.', base_lr, directory)
  run = train_loop.prepare(config, directory)
  try:
    return run.train()
  except train_loop.TrainingInterrupted as e:
    raise cli.Interrupted(e.signum, f'{e} (then the sweep goes on)') from e
  except train_loop.NonFiniteError as e:
    logging.warning('base_lr=%g diverged: %s', base_lr, e)
    return {}


def choose(results: dict) -> Optional[float]:
  """The base LR with the best minival top-1 (the smaller on a tie); None if all diverged."""
  scored = [(-r['eval_top1'], lr) for lr, r in results.items() if 'eval_top1' in r]
  return min(scored)[1] if scored else None


def _cells(result: dict) -> str:
  if not result:
    return 'diverged | diverged'
  test = result.get('test_top1')
  return f'{result["eval_top1"]:.2%} | {"-" if test is None else f"{test:.2%}"}'


def markdown(results: dict, chosen: Optional[float], config) -> str:
  lines = [f'{config.model.model_name} on {config.dataset}: minival {config.eval_split}, test '
           f'{config.test_split or "(none)"}, {config.total_steps} steps.', '',
           '| base_lr | minival top-1 | test top-1 | chosen |', '|---|---|---|---|']
  for lr, result in sorted(results.items()):
    lines.append(f'| {lr:g} | {_cells(result)} | {"**yes**" if lr == chosen else ""} |')
  if chosen is None:
    lines += ['', 'Every run diverged: no learning rate chosen.']
  else:
    minival, test = _cells(results[chosen]).split(' | ')
    lines += ['', f'Chosen base_lr={chosen:g} (best minival top-1, {minival}): test top-1 '
              f'{test}.']
  return '\n'.join(lines) + '\n'


def write_results(workdir: str, results: dict, chosen: Optional[float], table: str) -> None:
  summary = {'runs': [{'base_lr': lr, 'workdir': run_workdir(workdir, lr),
                       **{k: results[lr].get(k) for k in workdir_lib.RESULT_FIELDS}}
                      for lr in sorted(results)],
             'chosen_base_lr': chosen,
             'chosen_test_top1': None if chosen is None else results[chosen].get('test_top1')}
  checkpoint.write_atomically(os.path.join(workdir, 'sweep.json'), json.dumps(summary, indent=2))
  checkpoint.write_atomically(os.path.join(workdir, 'sweep.md'), table)


def main(argv):
  cli.check_no_arguments(argv)
  logging_util.quiet_libraries()
  fv = flags.FLAGS
  if fv.config is None or not fv.workdir:
    raise cli.UserError('--config and --workdir are required, e.g. '
                        '--config=configs/vit.py:b16,cifar10 --workdir=/tmp/sweep.')
  config = fv.config.unlock()
  results = {lr: fine_tune(config, lr, fv.workdir) for lr in parse_base_lrs(fv.base_lrs)}
  chosen = choose(results)
  table = markdown(results, chosen, config)
  write_results(fv.workdir, results, chosen, table)
  print(table, end='', flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""The learning-rate sweep of the paper's fine-tuning protocol (appendix B.1.1), behind
`python -m vit_jax.sweep` (see that command for the protocol): one fine-tune per base learning
rate in WORKDIR/lr_<base_lr>, the choice on minival, the results table."""
import json
import math
import os
from typing import Optional, Sequence

from absl import logging
import tensorflow as tf

from vit_jax import cli
from vit_jax import train_loop
from vit_jax import workdir as workdir_lib

RESULT_FIELDS = ('eval_top1', 'test_top1')


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


def finished_result(workdir: str, total_steps: int) -> Optional[dict]:
  """The final accuracies of a run that finished (model.npz written), else None."""
  if not tf.io.gfile.exists(workdir_lib.path(workdir, workdir_lib.MODEL)):
    return None
  result = {}
  for event in workdir_lib.read_metrics(workdir):
    if event['step'] == total_steps:
      result.update({k: event[k] for k in RESULT_FIELDS if k in event})
  return result if 'eval_top1' in result else None


def fine_tune(config, base_lr: float, workdir: str) -> dict:
  """{'eval_top1', 'test_top1'} of the run with `base_lr`; {} when its loss became non-finite."""
  config = config.copy_and_resolve_references()
  config.base_lr = base_lr
  directory = run_workdir(workdir, base_lr)
  result = finished_result(directory, config.total_steps)
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
                       **{k: results[lr].get(k) for k in RESULT_FIELDS}}
                      for lr in sorted(results)],
             'chosen_base_lr': chosen,
             'chosen_test_top1': None if chosen is None else results[chosen].get('test_top1')}
  with tf.io.gfile.GFile(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with tf.io.gfile.GFile(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write(table)

"""Runs the training runs of the selected claims, each in its own workdir; reuses finished ones.

A run is finished when its workdir holds `model.npz` and an evaluation of its last step in
`metrics.jsonl`; an unfinished workdir resumes from its checkpoint (vit_jax.train), so an
interrupted claims command continues where it stopped.
"""
import dataclasses
import functools
import os
from typing import Optional, Sequence

from absl import logging
import tqdm

from vit_jax import cli
from vit_jax import train_loop
from vit_jax import workdir as workdir_lib
from vit_jax.claims import experiments


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What the claims read from one finished run."""
  spec: experiments.RunSpec
  workdir: str
  steps: int
  train_flops_per_image: float
  batch: int
  curve: tuple  # ((step, eval top-1), ...), the last one at `steps`.
  failure: Optional[str] = None  # Why the run has no result (then curve is empty).

  @property
  def top1(self) -> float:
    return self.curve[-1][1]

  def compute(self, step: int) -> float:
    """Training FLOPs spent up to `step`."""
    return step * self.batch * self.train_flops_per_image


def read_curve(workdir: str) -> list:
  """[(step, eval_top1)] from WORKDIR/metrics.jsonl (empty when there is none)."""
  curve = {event['step']: event['eval_top1'] for event in workdir_lib.read_metrics(workdir)
           if 'eval_top1' in event}
  return sorted(curve.items())


def ordered(specs: Sequence[experiments.RunSpec]) -> list:
  """The distinct runs, every run after the run it is initialised from."""
  result = []
  for spec in specs:
    chain = [spec]
    while chain[-1].init_from is not None:
      chain.append(chain[-1].init_from)
    result += [s for s in reversed(chain) if s not in result]
  return result


def run_all(specs: Sequence[experiments.RunSpec], scale: experiments.Scale, dataset: str,
            runs_dir: str, data_dir: Optional[str] = None) -> dict:
  """{spec: RunResult}, training what is not finished yet, with a progress bar over the runs."""
  results = {}
  specs = ordered(specs)
  with tqdm.tqdm(specs, unit='run', desc='claims runs') as bar:
    for spec in bar:
      bar.set_postfix_str(spec.name)
      results[spec] = _run_one(spec, scale, dataset, runs_dir, data_dir, results)
  return results


def _run_one(spec, scale, dataset, runs_dir, data_dir, done) -> RunResult:
  config = experiments.run_config(spec, scale, dataset, runs_dir, data_dir)
  workdir = os.path.join(runs_dir, spec.name)
  result = functools.partial(RunResult, spec, workdir, config.total_steps,
                             experiments.train_flops(spec, scale), config.batch)
  parent = done.get(spec.init_from)
  if parent is not None and parent.failure:
    return result((), f'its initialisation run {spec.init_from.name} failed')
  if workdir_lib.final_result(workdir, config.total_steps) is not None:
    logging.info('Reusing the finished run %s.', workdir)
  else:
    try:
      train_loop.train_and_evaluate(config, workdir)
    except train_loop.NonFiniteError as e:
      logging.warning('Run %s failed: %s', workdir, e)
      return result((), str(e).splitlines()[0])
    except train_loop.TrainingInterrupted as e:
      raise cli.Interrupted(e.signum, f'{e} (rerun the claims command to resume)') from e
  return result(tuple(read_curve(workdir)))

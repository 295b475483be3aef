r"""A shareable Markdown report of one or more training runs, figures next to it in one folder.

  python -m vit_jax.report --workdir=runs/finetune [--workdir=runs/other ...] \
      --out=report/report.md

For each finished run (a workdir with its model.npz, local or gs://): its model's parameters and
FLOPs, training curves, final accuracies and the analyses of --analyses (vit_jax.analysis.outputs).
"""
import datetime
import math
import os
import re
from typing import Optional, Sequence

from absl import flags
from absl import logging
import jax

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import flops
from vit_jax import inference
from vit_jax import model_configs
from vit_jax import models
from vit_jax import workdir as workdir_lib
from vit_jax.analysis import outputs
from vit_jax.analysis import plots

# Paper, Table 1 (parameters in millions).
PAPER_PARAMS_M = {'B': 86, 'L': 307, 'H': 632}
TABLE1_MODELS = ('ViT-B_16', 'ViT-L_16', 'ViT-H_14')


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defined by the program only, so that importing this module adds no flags elsewhere."""
  flags.DEFINE_multi_string('workdir', None, 'Training workdir; repeat for several runs.',
                            flag_values=fv)
  flags.DEFINE_string('out', None, 'Markdown file to write; figures go into folders next to it.',
                      flag_values=fv)
  flags.DEFINE_list('analyses', ['posemb_similarity', 'filters', 'attention_distance',
                                 'attention_maps'],
                    f'Analyses run on each run\'s model, of {", ".join(outputs.ANALYSES)} '
                    '(fewshot reads the train split).', flag_values=fv)
  flags.register_validator('analyses', lambda names: set(names) <= set(outputs.ANALYSES),
                           f'--analyses takes names of {", ".join(outputs.ANALYSES)}.',
                           flag_values=fv)
  flags.DEFINE_list('images', [], 'Image files/directories for the attention analyses (default: '
                    'the run\'s eval split).', flag_values=fv)
  flags.DEFINE_integer('num_images', 128, 'Eval images averaged by attention_distance.',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('num_attention_maps', 4, 'Images shown by attention_maps.',
                       flag_values=fv)
  flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'fewshot: examples per class.',
                    flag_values=fv)
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.', flag_values=fv)
  flags.mark_flags_as_required(['workdir', 'out'], flag_values=fv)


def paper_params_m(model_name: str) -> Optional[int]:
  """Table 1 parameter count of a pure ViT-B/L/H (any patch size), else None."""
  match = re.fullmatch(r'ViT-([A-Za-z]+)_\d+', model_name)
  return PAPER_PARAMS_M.get(match.group(1)) if match else None


def count_params(model_config, num_classes: int, resolution: int) -> int:
  shapes = models.abstract_params(model_config, num_classes, resolution)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def _si(value: float) -> str:
  """86567656 -> '86.6M', 201024 -> '201.0k'."""
  for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if value >= scale:
      return f'{value / scale:.1f}{suffix}'
  return f'{value:.0f}'


def table1() -> str:
  """Paper Table 1 against parameters counted from our models (224px, 1000 classes)."""
  rows = ['| Model | Layers | Hidden D | MLP | Heads | Params (ours) | Params (paper) | '
          'FLOPs @224 |', '|---|---|---|---|---|---|---|---|']
  for name in TABLE1_MODELS:
    config = model_configs.get_model_config(name)
    t = config.transformer
    rows.append(f'| {name} | {t.num_layers} | {config.hidden_size} | {t.mlp_dim} | '
                f'{t.num_heads} | {_si(count_params(config, 1000, 224))} | '
                f'{paper_params_m(name)}M | {_si(flops.forward_flops(config, 224, 1000))} |')
  return '\n'.join(rows)


class Run:
  """One finished workdir: its config, metrics and trained model (model.npz)."""

  def __init__(self, workdir: str, name: str):
    self.workdir, self.name = workdir, name
    self.loaded = inference.load_model(workdir)
    self.config = self.loaded.run_config
    self.events = workdir_lib.read_metrics(workdir)

  def metric(self, key: str, pattern: str, pick=lambda values: values[-1]) -> str:
    """`pick` (default: the last) of the logged values of `key`, formatted; '—' if none."""
    values = [e[key] for e in self.events if key in e]
    return format(pick(values), pattern) if values else '—'


def runs_table(runs: Sequence[Run]) -> str:
  rows = ['| Run | Model | Dataset | Resolution | Params | Paper params | FLOPs/image | Steps | '
          'Final loss | Final eval top-1 | Best eval top-1 |',
          '|---|---|---|---|---|---|---|---|---|---|---|']
  for run in runs:
    loaded = run.loaded
    paper = paper_params_m(loaded.name)
    forward_flops = flops.forward_flops(loaded.model_config, loaded.resolution,
                                        loaded.num_classes)
    steps = max((e['step'] for e in run.events), default='—')
    rows.append(
        f'| {run.name} | {loaded.name} | {run.config.get("dataset", "—")} | '
        f'{loaded.resolution} | '
        f'{_si(count_params(loaded.model_config, loaded.num_classes, loaded.resolution))} | '
        f'{f"{paper}M" if paper else "—"} | {_si(forward_flops)} | {steps} | '
        f'{run.metric("loss", ".4f")} | {run.metric("eval_top1", ".2%")} | '
        f'{run.metric("eval_top1", ".2%", max)} |')
  return '\n'.join(rows)


def run_section(run: Run, out_dir: str, fv: flags.FlagValues) -> str:
  """The run's curves and analyses; figures go into out_dir/<run name>/."""
  figures = os.path.join(out_dir, run.name)
  os.makedirs(figures, exist_ok=True)
  loaded = run.loaded
  image = lambda path, alt: f'![{alt}]({os.path.relpath(path, out_dir)})'
  lines = [f'## Run `{run.name}`', '', f'Workdir `{run.workdir}`: {loaded.name} on '
           f'{run.config.get("dataset", "?")} at {loaded.resolution}px.', '',
           '### Training curves', '',
           image(plots.training_curves(run.events, os.path.join(figures, 'training_curves.png'),
                                       title=run.name), 'training curves'), '']
  for analysis in fv.analyses:
    # The attention maps show a few images; the attention distance averages over more.
    count = fv.num_attention_maps if analysis == 'attention_maps' else fv.num_images
    inputs = outputs.Inputs(figures, run.config, images=fv.images, num_images=count,
                            batch_size=fv.batch_size, shots=[int(n) for n in fv.shots])
    lines += outputs.markdown_section(analysis, loaded, inputs, image) + ['']
  return '\n'.join(lines)


def _run_names(workdirs: Sequence[str]) -> list[str]:
  """Folder names of the workdirs, numbered where they repeat."""
  names = []
  for workdir in workdirs:
    base = os.path.basename(os.path.normpath(workdir)) or 'run'
    name, i = base, 2
    while name in names:
      name, i = f'{base}_{i}', i + 1
    names.append(name)
  return names


def check_outputs(out: str, workdirs: Sequence[str], names: Sequence[str]) -> None:
  """Raises ValueError before anything is written when --out is a directory, or when the report
  or a run's figure folder (next to it, named after the run) would be a workdir it reads or lie
  inside one: a reading command never writes into its inputs."""
  if os.path.isdir(out):
    raise ValueError(f'--out={out} is a directory; pass the Markdown file to write, e.g. '
                     f'--out={os.path.join(out, "report.md")}.')
  out_dir = os.path.dirname(os.path.abspath(out))
  outputs = [(f'--out={out}', os.path.abspath(out))] + [
      (f'the figures of run {name!r}', os.path.join(out_dir, name)) for name in names]
  for workdir in workdirs:
    inside = os.path.realpath(workdir)
    for what, path in outputs:
      if os.path.commonpath([inside, os.path.realpath(path)]) == inside:
        raise ValueError(f'{what} would be written to {path}, into the workdir {workdir} that '
                         'the report reads; choose an --out in another folder.')


def write_report(fv: flags.FlagValues) -> str:
  names = _run_names(fv.workdir)
  check_outputs(fv.out, fv.workdir, names)
  out_dir = os.path.dirname(os.path.abspath(fv.out))
  os.makedirs(out_dir, exist_ok=True)
  runs = [Run(w, n) for w, n in zip(fv.workdir, names)]
  sections = [
      '# Vision Transformer report', '',
      f'Written by `python -m vit_jax.report` on {datetime.date.today().isoformat()}.', '',
      '## Models (paper Table 1)', '',
      'Parameters counted from our models with a 1000-class head at 224px; FLOPs are analytic '
      '(vit_jax.flops: multiply-adds x 2).', '', table1(), '',
      '## Runs', '', runs_table(runs), '',
  ]
  for run in runs:
    logging.info('Analysing run %s (%s).', run.name, run.workdir)
    sections.append(run_section(run, out_dir, fv))
  checkpoint.write_atomically(fv.out, '\n'.join(sections) + '\n')
  return fv.out


def main(argv: Sequence[str]) -> None:
  cli.check_no_arguments(argv)
  print(write_report(flags.FLAGS))


if __name__ == '__main__':
  define_flags()
  cli.run(main)

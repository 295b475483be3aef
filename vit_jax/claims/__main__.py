r"""Checks the paper's claims with miniature experiments and writes a report (see the README).

    python -m vit_jax.claims --out_dir=/tmp/claims [--claims=C1,C3] [--scale=quick|full] \
        [--dataset=fashion_mnist]

Training runs go to workdirs under OUT_DIR/runs/DATASET-SCALE/ (a rerun resumes, reusing the
finished ones); OUT_DIR/claims.md and claims.json give each claim's numbers and verdict.
"""
import datetime
import os
import time

from absl import flags

from vit_jax import cli
from vit_jax import input_pipeline
from vit_jax import logging_util
from vit_jax.claims import catalog
from vit_jax.claims import experiments
from vit_jax.claims import measure
from vit_jax.claims import report
from vit_jax.claims import runner
from vit_jax.claims import verdicts

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where the runs and the report go.')
_CLAIMS = flags.DEFINE_list('claims', [c.id for c in catalog.CLAIMS],
                            'Claims to check (default: all).')
_SCALE = flags.DEFINE_enum('scale', 'quick', list(experiments.SCALES), 'Budget of every run.')
_DATASET = flags.DEFINE_string('dataset', 'fashion_mnist', 'Any dataset of the input pipeline '
                               '(a tfds name or folder:/path).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data_dir.')


def selected_claims(ids) -> list:
  unknown = [i for i in ids if i.upper() not in catalog.CLAIMS_BY_ID]
  if unknown:
    raise cli.UserError(f'--claims: unknown {", ".join(unknown)}; expected some of '
                        f'{", ".join(catalog.CLAIMS_BY_ID)}.')
  return [catalog.CLAIMS_BY_ID[i.upper()] for i in ids]


def _evaluate(claim, ctx, dataset) -> dict:
  try:
    finding = claim.evaluate(ctx)
  except measure.MissingRun as e:
    finding = catalog.Finding({}, [], verdicts.Verdict(
        verdicts.INCONCLUSIVE, 'a run it needs has no result', str(e)))
  print(f'{claim.id} {claim.title}: {finding.verdict.verdict}\n  rule: {finding.verdict.rule}'
        f'\n  numbers: {finding.verdict.evidence}', flush=True)
  return report.claim_record(claim, finding, report.experiment_text(claim, ctx, dataset),
                             ctx.out_dir)


def main(argv):
  cli.check_no_arguments(argv)
  logging_util.quiet_libraries()
  if not _OUT_DIR.value:
    raise cli.UserError('--out_dir is required.')
  claims = selected_claims(_CLAIMS.value)
  scale, dataset, out_dir = experiments.SCALES[_SCALE.value], _DATASET.value, _OUT_DIR.value
  runs_dir = os.path.join(out_dir, 'runs', f'{dataset.replace("/", "_")}-{scale.name}')
  os.makedirs(runs_dir, exist_ok=True)
  start = time.time()
  specs = [spec for claim in claims for spec in claim.runs(scale)]
  results = runner.run_all(specs, scale, dataset, runs_dir, _DATA_DIR.value)
  any_config = experiments.run_config(experiments.RunSpec(), scale, dataset, runs_dir,
                                      _DATA_DIR.value)
  full = any_config.copy_and_resolve_references()
  full.train_split = any_config.train_split.split('[')[0]
  ctx = catalog.Context(results, scale, out_dir,
                        input_pipeline.get_dataset_info(any_config).num_eval_examples,
                        input_pipeline.get_dataset_info(full).num_train_examples)
  records = [_evaluate(claim, ctx, dataset) for claim in claims]
  header = {'scale': scale.name, 'note': scale.note, 'dataset': dataset, 'runs': len(results),
            'seconds': time.time() - start,
            'finished': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
  for path in report.write(records, header, out_dir):
    print(path)


if __name__ == '__main__':
  cli.run(main)

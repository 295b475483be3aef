"""Writes DIR/claims.md and DIR/claims.json from the claims' findings."""
import json
import os
from typing import Sequence

from vit_jax import checkpoint
from vit_jax.claims import catalog
from vit_jax.claims import experiments
from vit_jax.claims import verdicts


def experiment_text(claim: catalog.Claim, ctx: catalog.Context, dataset: str) -> str:
  """The runs behind a claim: model, data, steps, seeds."""
  specs = claim.runs(ctx.scale)
  if not specs:
    return 'No training runs.'
  runs = ', '.join(f'{s.name} ({experiments.steps(s, ctx.scale)} steps)'
                   for s in sorted(set(specs), key=lambda s: s.name))
  return (f'{experiments.describe_models(ctx.scale)}. '
          f'{dataset} at {experiments.REFERENCE_RESOLUTION}px unless named, batch '
          f'{ctx.scale.batch}, Adam (base LR {experiments.BASE_LR:g}, cosine), seeds '
          f'{list(ctx.scale.seeds)}, compute-matched steps; eval on {ctx.num_eval} examples. '
          f'Runs: {runs}.')


def claim_record(claim: catalog.Claim, finding: catalog.Finding, experiment: str,
                 out_dir: str) -> dict:
  verdict = finding.verdict
  return {'id': claim.id, 'title': claim.title, 'source': claim.source,
          'statement': claim.statement, 'paper_numbers': claim.paper_numbers,
          'experiment': experiment, 'numbers': finding.numbers, 'table': finding.table,
          'plots': [os.path.relpath(p, out_dir) for p in finding.plots],
          'verdict': verdict.verdict, 'rule': verdict.rule, 'evidence': verdict.evidence,
          'regime': claim.regime, 'commands': list(claim.commands)}


def _section(record: dict) -> list:
  lines = [f'## {record["id"]}. {record["title"]} ({record["source"]})', '',
           f'**Paper:** {record["statement"]}', '',
           f'**Paper\'s numbers:** {record["paper_numbers"]}', '',
           f'**Experiment here:** {record["experiment"]}', '', *record['table'], '']
  lines += [f'![{record["id"]}]({p})' for p in record['plots']]
  lines += ['', f'**Verdict: {record["verdict"]}**', '', f'Rule: {record["rule"]}.', '']
  if record['evidence']:
    lines += [f'Numbers: {record["evidence"]}.', '']
  lines += [f'Regime: {record["regime"]}', '']
  if record['commands']:
    lines += ['Commands:', ''] + [f'    {c}' for c in record['commands']] + ['']
  return lines


def write(records: Sequence[dict], header: dict, out_dir: str) -> tuple:
  """(claims.md path, claims.json path)."""
  json_path = os.path.join(out_dir, 'claims.json')
  checkpoint.write_atomically(json_path,
                              json.dumps({**header, 'claims': list(records)}, indent=1))
  lines = ['# The paper\'s claims, checked in miniature', '',
           f'Scale `{header["scale"]}`, dataset `{header["dataset"]}`, written '
           f'{header["finished"]}, {header["seconds"] / 60:.1f} min in total '
           f'({header["runs"]} training runs). {header["note"]}', '',
           'Verdicts come from the rules printed with each claim: '
           f'{", ".join(verdicts.VERDICTS)}.', '',
           '| claim | verdict |', '|---|---|']
  lines += [f'| {r["id"]}. {r["title"]} | {r["verdict"]} |' for r in records]
  lines.append('')
  for record in records:
    lines += _section(record)
  md_path = os.path.join(out_dir, 'claims.md')
  checkpoint.write_atomically(md_path, '\n'.join(lines))
  return md_path, json_path

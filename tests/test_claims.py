"""`python -m vit_jax.claims`: the command end to end at a tiny budget, every claim's runs, the
verdict rules on hand-made numbers, and claims evaluated on synthetic run results."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import models
from vit_jax import workdir as workdir_lib
from vit_jax.claims import catalog
from vit_jax.claims import experiments
from vit_jax.claims import measure
from vit_jax.claims import runner
from vit_jax.claims import verdicts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, N, I = verdicts.CONSISTENT, verdicts.NOT_CONSISTENT, verdicts.INCONCLUSIVE


def _claims_command(out_dir, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', 'vit_jax.claims', f'--out_dir={out_dir}',
                         *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_quick_scale_end_to_end(tmp_path):
  # One training run (the reference ViT) feeds C6 and C7; C9 times a tiny model.
  result = _claims_command(tmp_path, '--claims=C6,C7,C9', '--scale=quick')
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads((tmp_path / 'claims.json').read_text())
  assert (report['scale'], report['dataset'], report['runs']) == ('quick', 'fashion_mnist', 1)
  assert [c['id'] for c in report['claims']] == ['C6', 'C7', 'C9']
  for claim in report['claims']:
    assert {'statement', 'paper_numbers', 'experiment', 'numbers', 'table', 'plots', 'verdict',
            'rule', 'evidence', 'regime', 'commands'} <= claim.keys()
    assert claim['verdict'] in verdicts.VERDICTS
    for png in claim['plots']:
      assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'
  c6, c7, c9 = report['claims']
  assert c6['verdict'] == c7['verdict'] == I  # One seed: no spread, whatever the numbers.
  (layers,) = {len(s['mean_distance_px']) for s in c6['numbers']['per_seed']}
  assert layers == experiments.SCALES['quick'].layers
  assert -1 <= c7['numbers']['distance_correlation'][0] <= 1 and c7['plots']
  assert c9['verdict'] == verdicts.NOT_RUN and c9['commands']
  assert c9['numbers']['speed'][0]['images_per_s'] > 0
  markdown = (tmp_path / 'claims.md').read_text()
  for text in ('say nothing about the paper', '## C7. Position embeddings learn the grid',
               '**Verdict: inconclusive**',
               'Rule: (correlation of embedding similarity', '## C9.', 'Commands:',
               'python -m vit_jax.main'):
    assert text in markdown
  workdir = tmp_path / 'runs' / 'fashion_mnist-quick' / 'vit_s0'
  assert (workdir / 'model.npz').exists()
  assert 'C7 Position embeddings learn the grid: inconclusive' in result.stdout


def test_unknown_claim_is_a_user_error(tmp_path):
  result = _claims_command(tmp_path, '--claims=C1,C42')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('Error: --claims: unknown C42')
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('scale', sorted(experiments.SCALES))
def test_every_claims_runs_are_valid_distinct_and_compute_matched(scale):
  scale = experiments.SCALES[scale]
  specs = runner.ordered([s for claim in catalog.CLAIMS for s in claim.runs(scale)])
  assert len({s.name for s in specs}) == len(specs)
  for spec in specs:
    config = experiments.run_config(spec, scale, 'fashion_mnist', '/runs')
    config_lib.validate(config, num_devices=1, process_count=1)
    if spec.init_from is not None:
      assert specs.index(spec.init_from) < specs.index(spec)
      assert config.pretrained_path == f'/runs/{spec.init_from.name}/model.npz'
    # Steps x FLOPs per image = the budget share of the reference ViT's compute, where the
    # steps are not too few for rounding to a multiple of the evaluations to dominate.
    spent = config.total_steps * experiments.train_flops(spec, scale)
    reference = scale.steps * spec.budget * experiments.train_flops(experiments.RunSpec(), scale)
    if config.total_steps > 20:
      assert spent == pytest.approx(reference, rel=0.05)
    assert config.total_steps == scale.evals_per_run * config.eval_every
  assert {s.arch for s in specs} == set(experiments.ARCHITECTURES)


@pytest.mark.parametrize('effects,floor,expected', [
    ([3.0, 3.2], None, C), ([-3.0, -3.2], None, N), ([1.0, -0.5], None, I),
    ([0.5, 0.5], 1.0, I), ([3.0], 1.0, C), ([3.0], None, I)])
def test_positive_rule(effects, floor, expected):
  verdict = verdicts.positive(effects, 'effect', floor)
  assert verdict.verdict == expected
  assert 'exceeds 2x its spread' in verdict.rule and 'effect: mean' in verdict.evidence


@pytest.mark.parametrize('effects,floor,expected', [
    ([0.2, -0.1], None, C), ([3.0, 3.2], None, N), ([0.8, 1.6], None, I), ([0.1], 0.8, I)])
def test_equal_rule(effects, floor, expected):
  assert verdicts.equal(effects, 'effect', 1.0, floor).verdict == expected


def test_rank_correlation_rule_and_spearman():
  x = [1.0, 2.0, 3.0, 4.0, 5.0]
  assert verdicts.rank_correlation(x, [10, 20, 30, 50, 40], 'r').verdict == C
  assert verdicts.rank_correlation(x, [5, 4, 3, 2, 1], 'r').verdict == N
  assert verdicts.rank_correlation(x, [2, 4, 1, 5, 3], 'r').verdict == I  # rho 0.3
  assert verdicts.rank_correlation(x[:3], [1, 2, 3], 'r').verdict == I  # Too few models.
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=9), rng.normal(size=9)
  assert verdicts.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])


def test_all_of_and_accuracy_noise():
  v = {label: verdicts.Verdict(label, 'r', 'e') for label in (C, N, I)}
  assert verdicts.all_of([v[C], v[C]]).verdict == C
  assert verdicts.all_of([v[C], v[I]]).verdict == I
  assert verdicts.all_of([v[I], v[N]]).verdict == N
  assert verdicts.accuracy_noise(0.9, 1000) == pytest.approx(np.sqrt(2 * 0.9 * 0.1 / 1000))


def _synthetic(top1: dict, scale, points=1) -> dict:
  """RunResults with the given final top-1 (percent) per spec, curves rising to it."""
  return {spec: runner.RunResult(spec, f'/runs/{spec.name}', 10, 1e6, 8, tuple(
      (10 * (i + 1) // points, value / 100 * (i + 1) / points) for i in range(points)))
          for spec, value in top1.items()}


def _context(results, scale, tmp_path):
  return catalog.Context(results, scale, str(tmp_path), num_eval=10_000, num_train=60_000)


QUICK2 = experiments.Scale('test', 4, 8, (0, 1), 16, 1, (100,), (1.0, 3.0), 10_000, 2, 4, 10,
                           ())


@pytest.mark.parametrize('none_top1,expected', [(70.0, C), (85.0, N), (79.0, I)])
def test_position_embedding_claim_on_synthetic_runs(tmp_path, none_top1, expected):
  top1 = {'learn': 80.0, 'none': none_top1, 'learn2d': 80.3, 'sincos2d': 79.8}
  results = _synthetic({spec: top1[spec.posemb] + 0.1 * spec.seed
                        for spec in catalog.CLAIMS_BY_ID['C2'].runs(QUICK2)}, QUICK2)
  finding = catalog.CLAIMS_BY_ID['C2'].evaluate(_context(results, QUICK2, tmp_path))
  assert finding.verdict.verdict == expected
  assert finding.numbers['none'] == [none_top1, none_top1 + 0.1]


@pytest.mark.parametrize('gap_best,expected', [(85.2, C), (80.0, N)])
def test_classifier_claim_picks_each_best_learning_rate(tmp_path, gap_best, expected):
  # The token is best at LR x1, GAP at LR x3: compared at their own best rates.
  values = {('token', 1.0): 85.0, ('token', 3.0): 70.0, ('gap', 1.0): 60.0,
            ('gap', 3.0): gap_best}
  results = _synthetic({spec: values[spec.classifier, spec.lr_scale]
                        for spec in catalog.CLAIMS_BY_ID['C3'].runs(QUICK2)}, QUICK2)
  finding = catalog.CLAIMS_BY_ID['C3'].evaluate(_context(results, QUICK2, tmp_path))
  assert finding.verdict.verdict == expected
  assert finding.numbers['best_learning_rate'] == {'token': 2e-3, 'gap': 6e-3}
  assert os.path.exists(finding.plots[0])


@pytest.mark.parametrize('small_gap,expected', [(-10.0, C), (5.0, N)])
def test_data_size_claim_on_synthetic_runs(tmp_path, small_gap, expected):
  # ViT - ResNet: `small_gap` at 100 examples, 0 with all of them.
  def value(spec):
    vit_ahead = small_gap if spec.examples else 0.0
    return 80.0 + (vit_ahead if spec.arch == 'vit' else 0.0) + 0.05 * spec.seed
  results = _synthetic({s: value(s) for s in catalog.CLAIMS_BY_ID['C1'].runs(QUICK2)}, QUICK2)
  finding = catalog.CLAIMS_BY_ID['C1'].evaluate(_context(results, QUICK2, tmp_path))
  assert finding.verdict.verdict == expected
  assert finding.numbers['train_examples'] == [100, 60_000]


@pytest.mark.parametrize('hybrid_curve,expected', [
    ((70.0, 76.0, 82.0, 85.0), C),  # Ahead at small compute, equal at the largest.
    ((50.0, 60.0, 70.0, 85.0), N)])
def test_hybrid_claim_on_synthetic_curves(tmp_path, hybrid_curve, expected):
  curves = {'vit': (60.0, 70.0, 80.0, 85.0), 'hybrid': hybrid_curve,
            'resnet': (65.0, 72.0, 79.0, 83.0)}
  results = {spec: runner.RunResult(spec, '/w', 8, 3e6 if spec.arch == 'vit' else 1e6, 4, tuple(
      (i + 1, v / 100 + 0.001 * spec.seed) for i, v in enumerate(curves[spec.arch])))
             for spec in catalog.CLAIMS_BY_ID['C4'].runs(QUICK2)}
  finding = catalog.CLAIMS_BY_ID['C4'].evaluate(_context(results, QUICK2, tmp_path))
  assert finding.verdict.verdict == expected
  assert finding.numbers['compute_flops']['vit'] == [12e6, 24e6, 36e6, 48e6]
  assert len(finding.table) == 2 + 4


@pytest.mark.parametrize('finetuned,expected', [(85.0, C), (75.0, N)])
def test_resolution_claim_on_synthetic_runs(tmp_path, finetuned, expected):
  def value(spec):
    if spec.resolution == catalog.LOW_RESOLUTION:
      return 70.0
    return finetuned if spec.init_from is not None else 80.0
  results = _synthetic({s: value(s) for s in catalog.CLAIMS_BY_ID['C5'].runs(QUICK2)}, QUICK2)
  finding = catalog.CLAIMS_BY_ID['C5'].evaluate(_context(results, QUICK2, tmp_path))
  assert finding.verdict.verdict == expected
  assert finding.numbers['low_res_top1'] == [70.0, 70.0]


def _fake_finished_run(spec, scale, tmp_path):
  """A workdir as training leaves it (config.json, model.npz), with initial parameters."""
  workdir = str(tmp_path / spec.name)
  config = experiments.run_config(spec, scale, 'fashion_mnist', str(tmp_path))
  config.num_classes = 10
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(config, workdir)
  model = models.build_model(config.model, 10)
  init = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))
  params = init(jnp.zeros((1, 28, 28, 3)))['params']
  checkpoint.save_npz(params, os.path.join(workdir, 'model.npz'))
  return runner.RunResult(spec, workdir, 1, 1.0, 1, ((1, 0.5),))


def test_fewshot_of_a_resnet_run_and_the_fewshot_claim(tmp_path, monkeypatch):
  scale = experiments.SCALES['quick']
  run = _fake_finished_run(experiments.RunSpec('resnet'), scale, tmp_path)
  accuracy = measure.fewshot_accuracy(run, scale, str(tmp_path))
  assert 0 <= accuracy <= 100
  assert (tmp_path / 'analysis' / 'resnet_s0' / 'fewshot.json').exists()
  # The claim ranks its models by few-shot and by top-1: here made to agree exactly.
  specs = catalog.CLAIMS_BY_ID['C8'].runs(scale)
  results = _synthetic({spec: 50.0 + i for i, spec in enumerate(specs)}, scale)
  monkeypatch.setattr(measure, 'fewshot_accuracy', lambda r, *_: 100.0 * r.top1 - 20.0)
  finding = catalog.CLAIMS_BY_ID['C8'].evaluate(_context(results, scale, tmp_path))
  assert finding.verdict.verdict == C and 'rho = +1.000' in finding.verdict.evidence
  assert len(finding.numbers['models']) == len(specs) >= 4


def test_missing_or_failed_run_is_reported():
  spec = experiments.RunSpec()
  failed = runner.RunResult(spec, '/w', 1, 1.0, 1, (), failure='non-finite loss at step 3')
  with pytest.raises(measure.MissingRun, match='vit_s0: non-finite loss'):
    measure.ok({spec: failed}, spec)
  with pytest.raises(measure.MissingRun, match='resnet_s1: not run'):
    measure.ok({}, experiments.RunSpec('resnet', 1))


def test_finished_runs_are_recognised_and_parents_come_first(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 5, "eval_top1": 0.5}\n{"step": 10, "loss": 1.0}\n{"step": 10, "eval_top1": 0.7}\n'
      '{"step": 1')  # A line cut short.
  assert runner.read_curve(str(tmp_path)) == [(5, 0.5), (10, 0.7)]
  assert workdir_lib.final_result(str(tmp_path), 10) is None  # No model.npz yet.
  (tmp_path / 'model.npz').write_bytes(b'')
  assert workdir_lib.final_result(str(tmp_path), 10) == {'eval_top1': 0.7}
  assert workdir_lib.final_result(str(tmp_path), 20) is None
  pre = experiments.RunSpec(resolution=21, budget=0.5)
  fine = experiments.RunSpec(budget=0.5, init_from=pre)
  assert runner.ordered([fine, experiments.RunSpec(), fine, pre]) == [pre, fine,
                                                                       experiments.RunSpec()]
  assert fine.name == 'vit_c0.5_from-vit_r21_c0.5_s0_s0'


def test_grid_structure_statistics():
  grid = (4, 4)
  rows, cols = np.divmod(np.arange(16), 4)
  distance = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])
  same_line = (rows[:, None] == rows[None]) | (cols[:, None] == cols[None])
  similarity = 1.0 - 0.2 * distance + 0.3 * same_line
  found = measure.grid_structure(similarity, grid)
  assert found['same_line_effect'] == pytest.approx(0.3)
  assert found['distance_correlation'] > 0.5
  # Uniform attention over a 2x2 grid of 1px patches: 8 pairs at 1, 4 at sqrt(2), 4 at 0.
  assert measure.uniform_attention_distance((2, 2), 1.0) == pytest.approx(
      (8 + 4 * np.sqrt(2)) / 16)

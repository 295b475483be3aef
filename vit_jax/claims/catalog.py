"""The paper's claims: what each states, which runs test it, what is measured, which rule decides.

Each `Claim` lists its runs for a scale (`runs`) and turns the finished runs into a `Finding`
(`evaluate`): the numbers, the figures and the verdict of its rule (vit_jax.claims.verdicts).
Accuracies are in percent; effects are differences of accuracies in percentage points.
"""
import dataclasses
import os
from typing import Callable

import numpy as np

from vit_jax import cli
from vit_jax import models
from vit_jax.analysis import plots
from vit_jax.claims import compute
from vit_jax.claims import experiments
from vit_jax.claims import measure
from vit_jax.claims import verdicts

RunSpec = experiments.RunSpec
# Percentage points within which two accuracies count as "about equal": above twice the binomial
# noise of a difference on a 10k test set (2 x 0.57 at 80%), half the paper's no-posemb effect.
EQUAL_TOLERANCE = 1.5


@dataclasses.dataclass(frozen=True)
class Context:
  """What a claim's evaluation reads: the finished runs and where figures go."""
  results: dict  # {RunSpec: runner.RunResult}
  scale: experiments.Scale
  out_dir: str
  num_eval: int  # Examples of the eval split each accuracy is measured on.
  num_train: int  # Examples of the full train split.

  def floor(self, accuracies) -> float:
    """Binomial noise of a difference of two accuracies (percent) on the eval set."""
    return 100.0 * verdicts.accuracy_noise(float(np.mean(accuracies)) / 100.0, self.num_eval)

  def png(self, name: str) -> str:
    return os.path.join(self.out_dir, name)


@dataclasses.dataclass
class Finding:
  numbers: dict  # For claims.json.
  table: list  # Markdown table rows (the first is the header).
  verdict: verdicts.Verdict
  plots: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Claim:
  id: str
  title: str
  source: str  # Section / table / figure of the paper.
  statement: str
  paper_numbers: str
  regime: str  # What the miniature cannot test.
  runs: Callable[[experiments.Scale], list]
  evaluate: Callable[[Context], Finding]
  commands: tuple = ()  # For claims not run here: what would run them.


def _paired(ctx: Context, a: Callable, b: Callable) -> tuple:
  """(top-1 of a per seed, top-1 of b per seed, a - b per seed)."""
  xa, xb = (measure.top1s(ctx.results, make, ctx.scale.seeds) for make in (a, b))
  return xa, xb, [p - q for p, q in zip(xa, xb)]


def _grid(ctx: Context, make: Callable, values) -> np.ndarray:
  """[seeds, values] top-1 of `make(seed, value)`."""
  return np.array([measure.top1s(ctx.results, lambda s, v=v: make(s, v), ctx.scale.seeds)
                   for v in values]).T


# --- C1: data size ---------------------------------------------------------------------------


def _sizes(scale):
  return list(scale.data_sizes) + [None]


def _c1_runs(scale):
  return [RunSpec(arch, seed, examples=n) for arch in ('vit', 'resnet') for n in _sizes(scale)
          for seed in scale.seeds]


def _c1_evaluate(ctx: Context) -> Finding:
  sizes = _sizes(ctx.scale)
  acc = {a: _grid(ctx, lambda s, n, a=a: RunSpec(a, s, examples=n), sizes)
         for a in ('vit', 'resnet')}
  gap = acc['vit'] - acc['resnet']  # [seeds, sizes]
  counts = [n or ctx.num_train for n in sizes]
  small = verdicts.positive(list(-gap[:, 0]), f'ResNet - ViT top-1 at {counts[0]} examples',
                            ctx.floor(acc['vit'][:, 0]))
  catch_up = verdicts.positive(list(gap[:, -1] - gap[:, 0]),
                               f'(ViT - ResNet) at {counts[-1]} minus at {counts[0]} examples',
                               np.sqrt(2) * ctx.floor(acc['vit'][:, -1]))
  table = ['| train examples | ViT top-1 | ResNet top-1 | ViT - ResNet |', '|---|---|---|---|']
  table += [f'| {c} | {measure.mean_std(acc["vit"][:, i])} | '
            f'{measure.mean_std(acc["resnet"][:, i])} | {measure.mean_std(gap[:, i])} |'
            for i, c in enumerate(counts)]
  png = plots.curves({'ViT': (counts, acc['vit']), 'BiT ResNet': (counts, acc['resnet'])},
                     ctx.png('c1_data_size.png'), xlabel='training examples',
                     ylabel='test top-1 (%)', title='Accuracy vs data size (matched compute)')
  return Finding({'train_examples': counts, 'vit_top1': acc['vit'].tolist(),
                  'resnet_top1': acc['resnet'].tolist()}, table,
                 verdicts.all_of([small, catch_up]), [png])


# --- C2: position embeddings -------------------------------------------------------------------

def _c2_runs(scale):
  return [RunSpec(posemb=p, seed=s) for p in models.POSEMB_TYPES for s in scale.seeds]


def _c2_evaluate(ctx: Context) -> Finding:
  make = {p: (lambda s, p=p: RunSpec(posemb=p, seed=s)) for p in models.POSEMB_TYPES}
  learn, none, worse = _paired(ctx, make['learn'], make['none'])
  parts = [verdicts.positive(worse, '1-D learned - none', ctx.floor(learn))]
  table = ['| position embedding | top-1 |', '|---|---|',
           f'| learned 1-D (default) | {measure.mean_std(learn)} |',
           f'| none | {measure.mean_std(none)} |']
  for p in ('learn2d', 'sincos2d'):
    other, _, diff = _paired(ctx, make[p], make['learn'])
    parts.append(verdicts.equal(diff, f'{p} - 1-D learned', EQUAL_TOLERANCE, ctx.floor(other)))
    table.append(f'| {p} | {measure.mean_std(other)} |')
  numbers = {p: measure.top1s(ctx.results, make[p], ctx.scale.seeds) for p in make}
  return Finding(numbers, table, verdicts.all_of(parts))


# --- C3: class token vs global average pooling -------------------------------------------------


def _c3_runs(scale):
  return [RunSpec(classifier=c, lr_scale=lr, seed=s) for c in ('token', 'gap')
          for lr in scale.lr_scales for s in scale.seeds]


def _c3_evaluate(ctx: Context) -> Finding:
  lrs = ctx.scale.lr_scales
  acc = {c: _grid(ctx, lambda s, lr, c=c: RunSpec(classifier=c, lr_scale=lr, seed=s), lrs)
         for c in ('token', 'gap')}  # [seeds, lrs]
  best = {c: int(np.argmax(acc[c].mean(axis=0))) for c in acc}
  diff = list(acc['token'][:, best['token']] - acc['gap'][:, best['gap']])
  verdict = verdicts.equal(diff, 'class token - GAP, each at its best learning rate',
                           EQUAL_TOLERANCE, ctx.floor(acc['token'][:, best['token']]))
  base = [experiments.BASE_LR * lr for lr in lrs]
  table = ['| learning rate | class token | GAP |', '|---|---|---|']
  table += [f'| {lr:.1e} | {measure.mean_std(acc["token"][:, i])} | '
            f'{measure.mean_std(acc["gap"][:, i])} |' for i, lr in enumerate(base)]
  png = plots.curves({'class token': (base, acc['token']), 'GAP': (base, acc['gap'])},
                     ctx.png('c3_classifier_lr.png'), xlabel='base learning rate (Adam)',
                     ylabel='test top-1 (%)', title='Class token vs GAP: learning rate')
  return Finding({'learning_rates': base, 'token_top1': acc['token'].tolist(),
                  'gap_top1': acc['gap'].tolist(),
                  'best_learning_rate': {c: base[i] for c, i in best.items()}}, table, verdict,
                 [png])


# --- C4: hybrids at small compute --------------------------------------------------------------

_C4_ARCHS = ('vit', 'hybrid', 'resnet')


def _c4_runs(scale):
  return [RunSpec(arch, seed) for arch in _C4_ARCHS for seed in scale.seeds]


def _c4_evaluate(ctx: Context) -> Finding:
  curves, compute = {}, {}
  for arch in _C4_ARCHS:
    runs = [measure.ok(ctx.results, RunSpec(arch, s)) for s in ctx.scale.seeds]
    curves[arch] = np.array([[100.0 * top1 for _, top1 in r.curve] for r in runs])
    compute[arch] = [runs[0].compute(step) for step, _ in runs[0].curve]
  n = min(c.shape[1] for c in curves.values())  # Evaluated at the same compute fractions.
  gap = curves['hybrid'][:, :n] - curves['vit'][:, :n]
  floor = ctx.floor(curves['vit'][:, 0])
  verdict = verdicts.all_of([
      verdicts.positive(list(gap[:, 0]), 'hybrid - ViT at the smallest compute', floor),
      verdicts.positive(list(gap[:, 0] - gap[:, -1]),
                        'hybrid advantage at the smallest minus at the largest compute',
                        np.sqrt(2) * floor)])
  table = ['| training PFLOPs | ViT | R+ViT hybrid | BiT ResNet |', '|---|---|---|---|']
  table += [f'| {compute["vit"][i] / 1e15:.3g} | ' + ' | '.join(
      measure.mean_std(curves[a][:, i]) for a in _C4_ARCHS) + ' |' for i in range(n)]
  png = plots.curves({a: (compute[a][:n], curves[a][:, :n]) for a in _C4_ARCHS},
                     ctx.png('c4_compute.png'), xlabel='training FLOPs',
                     ylabel='test top-1 (%)', title='Accuracy vs training compute')
  return Finding({'compute_flops': {a: compute[a][:n] for a in _C4_ARCHS},
                  'top1': {a: curves[a][:, :n].tolist() for a in _C4_ARCHS}}, table, verdict,
                 [png])


# --- C5: fine-tuning at a higher resolution ----------------------------------------------------

LOW_RESOLUTION = 21


def _c5_specs(seed):
  pretrain = RunSpec(resolution=LOW_RESOLUTION, budget=0.5, seed=seed)
  return pretrain, RunSpec(budget=0.5, init_from=pretrain, seed=seed), RunSpec(seed=seed)


def _c5_runs(scale):
  return [spec for s in scale.seeds for spec in _c5_specs(s)]


def _c5_evaluate(ctx: Context) -> Finding:
  fine, single, diff = _paired(ctx, lambda s: _c5_specs(s)[1], lambda s: _c5_specs(s)[2])
  low = measure.top1s(ctx.results, lambda s: _c5_specs(s)[0], ctx.scale.seeds)
  verdict = verdicts.positive(diff, f'{LOW_RESOLUTION}px pre-training + 28px fine-tuning - '
                              '28px only, same total compute', ctx.floor(fine))
  table = ['| schedule (same total FLOPs) | top-1 |', '|---|---|',
           f'| half the compute at {LOW_RESOLUTION}px (evaluated at {LOW_RESOLUTION}px) | '
           f'{measure.mean_std(low)} |',
           f'| ... then half at 28px (fine-tuned) | {measure.mean_std(fine)} |',
           f'| all at 28px | {measure.mean_std(single)} |']
  return Finding({'low_res_top1': low, 'finetuned_top1': fine, 'single_res_top1': single},
                 table, verdict)


# --- C6 / C7: inspecting the trained ViT -------------------------------------------------------


def _reference_runs(scale):
  return [RunSpec(seed=s) for s in scale.seeds]


def _c6_evaluate(ctx: Context) -> Finding:
  stats = [measure.attention_distance(measure.ok(ctx.results, spec), ctx.scale, ctx.out_dir)
           for spec in _reference_runs(ctx.scale)]
  slopes = [s['slope_px_per_layer'] for s in stats]
  lowest = [s['global_fraction'][0] for s in stats]
  verdict = verdicts.all_of([
      verdicts.positive(slopes, 'slope of mean attention distance vs depth (px / layer)'),
      verdicts.positive(lowest, 'fraction of global heads in the first layer')])
  layers = len(stats[0]['global_fraction'])
  table = ['| layer | mean distance (px) | fraction of global heads |', '|---|---|---|']
  table += [f'| {i + 1} | '
            f'{measure.mean_std([np.mean(s["mean_distance_px"][i]) for s in stats])} | '
            f'{measure.mean_std([s["global_fraction"][i] for s in stats])} |'
            for i in range(layers)]
  table.append(f'| (uniform attention) | {stats[0]["uniform_distance_px"]:.2f} | global: >= '
               f'{measure.GLOBAL_FRACTION:g} x this |')
  return Finding({'per_seed': [{k: v for k, v in s.items() if k != 'png'} for s in stats]},
                 table, verdict, [stats[0]['png']])


def _c7_evaluate(ctx: Context) -> Finding:
  stats = [measure.posemb_structure(measure.ok(ctx.results, spec), ctx.out_dir)
           for spec in _reference_runs(ctx.scale)]
  corr = [s['distance_correlation'] for s in stats]
  line = [s['same_line_effect'] for s in stats]
  verdict = verdicts.all_of([
      verdicts.positive(corr, 'correlation of embedding similarity with -grid distance'),
      verdicts.positive(line, 'same-row/column similarity bonus at equal distance')])
  table = ['| statistic | value |', '|---|---|',
           f'| corr(cosine similarity, -distance) | {measure.mean_std(corr)} |',
           f'| same row/column coefficient | {measure.mean_std(line)} |']
  return Finding({'distance_correlation': corr, 'same_line_effect': line}, table, verdict,
                 [stats[0]['png']])


# --- C8: few-shot tracks fine-tuning -----------------------------------------------------------

_C8_MODELS = (RunSpec(), RunSpec('resnet'), RunSpec('hybrid'), RunSpec(classifier='gap'),
              RunSpec(posemb='none'), RunSpec(posemb='learn2d'), RunSpec(posemb='sincos2d'))


def _c8_evaluate(ctx: Context) -> Finding:
  names, shots, top1 = [], [], []
  for spec in _C8_MODELS:
    result = measure.ok(ctx.results, spec)
    names.append(spec.name)
    shots.append(measure.fewshot_accuracy(result, ctx.scale, ctx.out_dir))
    top1.append(100.0 * result.top1)
  verdict = verdicts.rank_correlation(shots, top1, '5-shot linear vs trained top-1')
  table = ['| model | 5-shot linear | top-1 |', '|---|---|---|']
  table += [f'| {n} | {s:.2f} | {t:.2f} |' for n, s, t in zip(names, shots, top1)]
  png = plots.scatter(shots, top1, names, ctx.png('c8_fewshot.png'),
                      xlabel='5-shot linear accuracy (%)', ylabel='test top-1 (%)',
                      title='Few-shot vs full training')
  return Finding({'models': names, 'fewshot5': shots, 'top1': top1}, table, verdict, [png])


# --- C9: the headline tables -------------------------------------------------------------------

HEADLINE_COMMANDS = (
    'python -m vit_jax.weights fetch ViT-L_16 --dest=checkpoints',
    'python -m vit_jax.main --workdir=/tmp/l16_cifar10 --config=configs/vit.py:l16,cifar10 '
    '--config.pretrained_dir=checkpoints',
    'python -m vit_jax.main --workdir=/tmp/l16_imagenet --config=configs/vit.py:l16,imagenet2012 '
    '--config.pretrained_dir=checkpoints',
    'python -m vit_jax.analyze --analysis=speed --speed_models=ViT-B_16,ViT-L_16,ViT-H_14,'
    'BiT-R50x1,BiT-R101x1 --resolutions=224,384 --batch_sizes=1,64,256 --out_dir=/tmp/speed',
)


def _c9_evaluate(ctx: Context) -> Finding:
  records = measure.speed(ctx.scale)
  table = ['| model | resolution | batch | images/s (this machine) |', '|---|---|---|---|']
  table += [f'| {r["model"]} | {r["resolution"]} | {r["batch_size"]} | '
            f'{r["images_per_s"]:.1f} |' for r in records]
  return Finding({'speed': records}, table, verdicts.not_run(
      'needs the released checkpoints, ImageNet / CIFAR / VTAB and an accelerator (the '
      'commands below; likewise h14 / b16 / l32 and cifar100, oxford_iiit_pet, '
      'oxford_flowers102)'))


# --- C10: Table 2's compute column ----------------------------------------------------------


def _c10_evaluate(ctx: Context, flops_per_image=None) -> Finding:
  """No training: the compiled pre-training steps' FLOPs (vit_jax.claims.compute)."""
  del ctx
  try:
    rows, verdict = compute.check(flops_per_image)
  except cli.UserError as e:  # libtpu is not installed.
    return Finding({}, [], verdicts.not_run(str(e)))
  table = ['| run | FLOPs / image (compiled) | epochs | images | total FLOPs | core-days (paper) '
           '| implied utilization |', '|---|---|---|---|---|---|---|']
  table += [f'| {r["name"]} | {r["flops_per_image"]:.3g} | {r["epochs"]} | {r["images"]:,} | '
            f'{r["total_flops"]:.3g} | {r["core_days"]:,} | {r["utilization"]:.0%} |'
            for r in rows]
  return Finding({'runs': rows}, table, verdict)


CLAIMS = (
    Claim('C1', 'Data size', 'Sec. 4.3, Fig. 3-4',
          'With little pre-training data BiT ResNets beat ViT; with more data ViT catches up '
          '(and wins from ~90M images).',
          'ImageNet-1k pre-training: BiT > ViT-L; ImageNet-21k: comparable; JFT-300M: ViT-L/H '
          'win. JFT subsets: ResNets better at 9M, ViT better from 90M images.',
          'The regime where ViT wins (>= 90M images, ViT-L/H) is far beyond 60k Fashion-MNIST '
          'images and tiny models: tested is only whether the gap moves in ViT\'s favour with '
          'more data.', _c1_runs, _c1_evaluate),
    Claim('C2', 'Position embeddings', 'Appendix D.4, Table 8',
          'No position embedding is clearly worse; 1-D, 2-D and relative embeddings are about '
          'equal.',
          'ViT-B/16, ImageNet 5-shot linear: none 61.38, 1-D 64.21, 2-D 64.00, relative 64.03.',
          'A 4x4 patch grid (the paper: 14x14); relative embeddings are not implemented, '
          'fixed 2-D sine-cosine ones are tested instead. Measured by trained top-1.',
          _c2_runs, _c2_evaluate),
    Claim('C3', 'Class token vs global average pooling', 'Appendix D.3, Fig. 9',
          'Class token and GAP work equally well once each has its own learning rate.',
          'Figure only: both reach the same ImageNet 5-shot accuracy at different learning '
          'rates; GAP at the class token\'s rate does much worse.',
          'Adam learning rates swept over a small grid; the best rate is chosen on the eval '
          'split (no separate validation split here).', _c3_runs, _c3_evaluate),
    Claim('C4', 'Hybrids at small compute', 'Sec. 4.2, Fig. 5',
          'Hybrids slightly beat ViT at small compute; the difference vanishes for larger '
          'models.',
          'Figure only (Table 6 of the paper lists the models); ViT needs 2-4x less compute '
          'than ResNets for the same transfer accuracy.',
          'Compute varies here by training steps of one tiny model per family, not by model '
          'size; all at matched FLOPs per evaluation point.', _c4_runs, _c4_evaluate),
    Claim('C5', 'Higher resolution fine-tuning', 'Sec. 3.2',
          'Fine-tuning at a higher resolution than pre-training helps.',
          'No single number; all headline results pre-train at 224px and fine-tune at 384px '
          '(512 / 518 for H/14).',
          'Pre-training and fine-tuning on the same data at 21px -> 28px, against the same '
          'FLOPs at 28px; at this scale fine-tuning relearns much of the model (see the demo).',
          _c5_runs, _c5_evaluate),
    Claim('C6', 'Attention distance', 'Sec. 4.5, Fig. 7 right, Fig. 11',
          'Mean attention distance grows with depth; some heads attend globally already in '
          'the lowest layers.',
          'Figure only: ViT-L/16 at 224px, lowest-layer heads from local to most of the image.',
          'A 4x4 patch grid of 7px patches (the paper: 14x14 of 16px); "global" is '
          f'>= {measure.GLOBAL_FRACTION:g} x the distance of uniform attention.',
          _reference_runs, _c6_evaluate),
    Claim('C7', 'Position embeddings learn the grid', 'Sec. 4.5, Fig. 7 centre',
          'Closer patches have more similar position embeddings; row/column structure appears.',
          'Figure only (ViT-L/32).',
          'A 4x4 grid has few distinct distances; the statistics are coarse.',
          _reference_runs, _c7_evaluate),
    Claim('C8', 'Few-shot tracks fine-tuning', 'Sec. 4.1, Fig. 3-6 metrics',
          'Few-shot linear accuracy on frozen features is a cheap stand-in that ranks models '
          'like their fine-tuning accuracy.',
          'Used throughout Fig. 3-6 (ImageNet 5-shot / 10-shot linear); no single number.',
          'The models are trained on the same dataset the few-shot probe uses, not pre-trained '
          'on another one.', lambda scale: list(_C8_MODELS), _c8_evaluate),
    Claim('C9', 'Headline tables', 'Table 2, Table 5, Fig. 12',
          'ViT-H/14 and ViT-L/16 (JFT) match or beat BiT-L at less pre-training compute; '
          'ViT inference speed is comparable to ResNets of similar accuracy.',
          'Table 2: ViT-H/14 88.55 ImageNet, 90.72 ReaL, 99.50 CIFAR-10, 94.55 CIFAR-100, '
          '97.56 Pets, 99.68 Flowers, 77.63 VTAB; ViT-L/16 (JFT) 87.76 / 90.54 / 99.42 / '
          '93.90 / 97.32 / 99.74 / 76.28; BiT-L 87.54 / 90.54 / 99.37 / 93.51 / 96.62 / 99.63 '
          '/ 76.29. Public code on one A100 at 384px: ViT-B/16 CIFAR-10 99.02, CIFAR-100 '
          '92.06, ImageNet 84.53.',
          'Needs the released weights, the datasets and an accelerator; only inference speed '
          'of small models is measured here.', lambda scale: [], _c9_evaluate,
          commands=HEADLINE_COMMANDS),
    Claim('C10', 'Pre-training compute', 'Table 2, last column',
          'ViT-H/14 and ViT-L/16 pre-train with substantially less compute than BiT-L '
          '(TPUv3-core-days).',
          'TPUv3-core-days: ViT-H/14 JFT 2.5k, ViT-L/16 JFT 0.68k, ViT-L/16 ImageNet-21k 0.23k, '
          'BiT-L (R152x4) 9.9k: BiT-L ~4x ViT-H/14.',
          'FLOPs only: compiled (XLA:TPU\'s count of our pre-training step at 224px, bf16, batch '
          '4096), times the epochs and dataset sizes; no run is timed. The rule cannot see how '
          'fast each model runs on a TPU: convolutions and attention reach different fractions '
          'of the MXU peak, as do input pipelines, and the paper\'s own code, precision, '
          'batch and rematerialisation are not ours. Epochs of ViT-L/16 (7/14, 30/90) and BiT-L '
          '(40, from the BiT paper) are assumptions.', lambda scale: [], _c10_evaluate),
)
CLAIMS_BY_ID = {c.id: c for c in CLAIMS}

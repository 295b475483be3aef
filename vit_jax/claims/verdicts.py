"""Verdict rules: a claim's verdict comes from the measured numbers through one of these.

Each returns a `Verdict`: the rule in words (printed by the report) and the numbers it was applied
to. An effect's spread is its standard deviation over seeds, at least `floor` (for accuracies:
`accuracy_noise`); with one seed and no floor there is none and the verdict is inconclusive.
"""
import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

CONSISTENT = 'consistent'
NOT_CONSISTENT = 'not consistent'
INCONCLUSIVE = 'inconclusive'
NOT_RUN = 'not run here'
VERDICTS = (CONSISTENT, NOT_CONSISTENT, INCONCLUSIVE, NOT_RUN)


@dataclasses.dataclass(frozen=True)
class Verdict:
  verdict: str  # One of VERDICTS.
  rule: str  # The rule, in words.
  evidence: str  # The numbers it was applied to.


def accuracy_noise(accuracy: float, num_examples: int) -> float:
  """Standard error of the difference of two accuracies near `accuracy` on `num_examples`."""
  return math.sqrt(2.0 * accuracy * (1.0 - accuracy) / max(num_examples, 1))


def _decide(effects: Sequence[float], what: str, floor: Optional[float], rule: str,
            consistent: Callable, not_consistent: Callable) -> Verdict:
  """`consistent(mean, spread)`, else `not_consistent(mean, spread)`, else inconclusive."""
  s = float(np.std(effects)) if len(effects) > 1 else None
  if floor is not None:
    s = max(s or 0.0, floor)
  mean = float(np.mean(effects))
  verdict = (INCONCLUSIVE if s is None else CONSISTENT if consistent(mean, s)
             else NOT_CONSISTENT if not_consistent(mean, s) else INCONCLUSIVE)
  values = ', '.join(f'{e:+.4g}' for e in effects)
  s_text = 'none (one seed)' if s is None else f'{s:.4g}'
  return Verdict(verdict, rule,
                 f'{what}: mean {mean:+.4g} over seeds [{values}], spread {s_text}')


def positive(effects: Sequence[float], what: str, floor: Optional[float] = None) -> Verdict:
  """The claim: `what` > 0."""
  return _decide(effects, what, floor, f'{what} > 0 claimed: consistent if its mean exceeds 2x '
                 'its spread, not consistent if it is below -2x its spread, else inconclusive '
                 '(spread larger than the effect)',
                 lambda m, s: m > 2 * s, lambda m, s: m < -2 * s)


def equal(effects: Sequence[float], what: str, tolerance: float,
          floor: Optional[float] = None) -> Verdict:
  """The claim: `what` is about 0 (|what| <= tolerance)."""
  return _decide(effects, what, floor, f'{what} ~ 0 claimed: consistent if |mean| <= '
                 f'{tolerance:g} and 2x spread <= {tolerance:g}, not consistent if |mean| > '
                 f'{tolerance:g} + 2x spread, else inconclusive',
                 lambda m, s: abs(m) <= tolerance and 2 * s <= tolerance,
                 lambda m, s: abs(m) > tolerance + 2 * s)


def rank_correlation(x: Sequence[float], y: Sequence[float], what: str, threshold: float = 0.5,
                     min_points: int = 4) -> Verdict:
  """The claim: `x` and `y` rank the same items alike (Spearman correlation)."""
  rule = (f'{what}: Spearman rank correlation over >= {min_points} items; consistent if >= '
          f'{threshold:g}, not consistent if <= 0, else inconclusive')
  if len(x) < min_points:
    return Verdict(INCONCLUSIVE, rule, f'only {len(x)} items')
  rho = spearman(x, y)
  verdict = (CONSISTENT if rho >= threshold else NOT_CONSISTENT if rho <= 0 else INCONCLUSIVE)
  return Verdict(verdict, rule, f'rho = {rho:+.3f} over {len(x)} items')


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Pearson correlation of the ranks (ties ranked in order of appearance)."""
  rx, ry = (np.argsort(np.argsort(np.asarray(v, np.float64), kind='stable')) for v in (x, y))
  if rx.std() == 0 or ry.std() == 0:
    return 0.0
  return float(np.corrcoef(rx, ry)[0, 1])


def all_of(verdicts: Sequence[Verdict]) -> Verdict:
  """A claim of several parts: not consistent if one part is, consistent if all are."""
  labels = {v.verdict for v in verdicts}
  verdict = (NOT_CONSISTENT if NOT_CONSISTENT in labels else CONSISTENT
             if labels <= {CONSISTENT} else INCONCLUSIVE)
  return Verdict(verdict, ' AND '.join(f'({v.rule})' for v in verdicts),
                 '; '.join(v.evidence for v in verdicts))


def not_run(reason: str) -> Verdict:
  return Verdict(NOT_RUN, 'not run here: ' + reason, '')

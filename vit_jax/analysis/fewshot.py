"""Few-shot linear evaluation (section 4.5): closed-form regularised least squares from frozen
representations to {-1, 1}^K targets, with `shots` training examples drawn per class."""
from typing import Sequence

import numpy as np


def fit_least_squares(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      l2_reg: float):
  """Ridge regression to {-1, 1} one-hot targets, the bias left unregularised.

  Returns (weights [d, K], bias [K]) minimising |X W + b - Y|^2 + l2_reg |W|^2; centring X and Y
  gives W = (Xc'Xc + l2_reg I)^-1 Xc'Yc and b = mean(Y) - mean(X) W.
  """
  x = np.asarray(features, np.float64)
  targets = 2.0 * np.eye(num_classes)[labels] - 1.0
  x_mean, y_mean = x.mean(axis=0), targets.mean(axis=0)
  xc = x - x_mean
  weights = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(x.shape[1]), xc.T @ (targets - y_mean))
  return weights, y_mean - x_mean @ weights


def sample_shots(labels: np.ndarray, num_classes: int, shots: int,
                 rng: np.random.Generator) -> np.ndarray:
  """Indices of `shots` distinct examples of every class, drawn at random."""
  indices = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise ValueError(f'Class {c} has {len(members)} examples in the few-shot pool; {shots} '
                       'shots need more (raise --fewshot_pool).')
    indices.append(rng.choice(members, shots, replace=False))
  return np.concatenate(indices)


def evaluate(train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray,
             eval_labels: np.ndarray, *, num_classes: int, shots: Sequence[int], seeds: int,
             l2_reg: float) -> dict:
  """{shots: {'mean', 'std', 'accuracies'}}: eval accuracy of a classifier fitted on `shots`
  examples per class from the training pool, for each of `seeds` random draws."""
  results = {}
  for n in shots:
    accuracies = []
    for seed in range(seeds):
      chosen = sample_shots(train_labels, num_classes, n, np.random.default_rng(seed))
      weights, bias = fit_least_squares(train_features[chosen], train_labels[chosen],
                                        num_classes, l2_reg)
      predictions = np.argmax(np.asarray(eval_features, np.float64) @ weights + bias, axis=-1)
      accuracies.append(float(np.mean(predictions == eval_labels)))
    results[n] = {'mean': float(np.mean(accuracies)), 'std': float(np.std(accuracies)),
                  'accuracies': accuracies}
  return results

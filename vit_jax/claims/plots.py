"""The claims report's figures (PNG, matplotlib Agg): curves with their seed spread, scatter."""
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from vit_jax.analysis import plots as analysis_plots  # Selects the Agg backend first.

_save = analysis_plots._save  # pylint: disable=protected-access


def curves(series: Mapping[str, tuple], path: str, *, xlabel: str, ylabel: str, title: str,
           logx: bool = True) -> str:
  """One line per series {label: (x [n], values [seeds, n])}: the mean over seeds, with a band
  of +- one standard deviation."""
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for label, (x, values) in series.items():
    values = np.asarray(values, np.float64).reshape(-1, len(x))
    mean, std = values.mean(axis=0), values.std(axis=0)
    ax.plot(x, mean, marker='o', markersize=4, label=label)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  if logx:
    ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def scatter(x: Sequence[float], y: Sequence[float], labels: Sequence[str], path: str, *,
            xlabel: str, ylabel: str, title: str) -> str:
  """Labelled points."""
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.scatter(x, y)
  for xi, yi, label in zip(x, y, labels):
    ax.annotate(label, (xi, yi), fontsize=7, xytext=(3, 3), textcoords='offset points')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  return _save(fig, path)

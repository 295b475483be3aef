"""AugReg checkpoints ("How to train your ViT?") by short model name, through the bucket's index.

    python -m vit_jax.checkpoint fetch augreg:B_16
    python -m vit_jax.main --workdir=/tmp/w --config=configs/augreg.py:B_16,cifar10

`gs://vit_models/augreg/index.csv` has one row per (pre-training, fine-tuning) pair; its columns
include `name` ("B/16"), `ds` (pre-training data: i1k, i21k, i21k_30), `final_val` (the
pre-training's final validation accuracy), `filename` (the pre-trained checkpoint,
`augreg/<filename>.npz`) and `adapt_filename`. A short name ('B_16', 'R26_S_32') stands, as in
the official configs/augreg.py, for the i21k pre-training of that model with the best
`final_val`; a full filename ('B_16-i21k-300ep-lr_0.001-...') stands for itself.
"""
import csv
import os
from typing import Optional

from vit_jax import checkpoint
from vit_jax import model_configs

PREFIX = 'augreg:'
BUCKET = 'augreg'
INDEX = 'index.csv'


def model_name(short: str) -> str:
  """Our model config name of an AugReg short name: 'B_16' -> 'ViT-B_16', 'R26_S_32' ->
  'R26+ViT-S_32', 'R_Ti_16' -> 'R+ViT-Ti_16'; raises ValueError for one we do not have."""
  if short.startswith('R'):
    stem, vit = short.split('_', 1)
    name = f'{stem}+ViT-{vit}'
  else:
    name = f'ViT-{short}'
  if name not in model_configs.MODEL_CONFIGS:
    raise ValueError(f'AugReg model {short!r} has no model config here ({name} is not one of '
                     f'{", ".join(model_configs.MODEL_CONFIGS)}).')
  return name


def index_path(dest: str = 'checkpoints', base_url: str = checkpoint.DEFAULT_BASE_URL) -> str:
  """The local copy of the bucket's index.csv (`dest/augreg/index.csv`), fetched once."""
  path = os.path.join(dest, BUCKET, INDEX)
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.download(f'{base_url.rstrip("/")}/{BUCKET}/{INDEX}', path)
  return path


def read_index(path: str) -> list[dict]:
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  missing = {'ds', 'final_val', 'filename'} - set(rows[0] if rows else ())
  if missing:
    raise ValueError(f'{path} is not an AugReg index.csv: no column(s) {sorted(missing)}.')
  return rows


def best_i21k(rows: list[dict], short: str) -> str:
  """The filename of `short`'s i21k pre-training with the highest final_val."""
  candidates = [r for r in rows if r['filename'].split('-')[0] == short and r['ds'] == 'i21k']
  if not candidates:
    known = sorted({r['filename'].split('-')[0] for r in rows})
    raise ValueError(f'No i21k AugReg checkpoint of {short!r}; the index has {", ".join(known)}.')
  return max(candidates, key=lambda r: float(r['final_val']))['filename']


def resolve(spec: str, index: Optional[str] = None) -> tuple[str, str]:
  """('augreg:')SHORT or a full filename -> (filename without .npz, our model name)."""
  spec = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
  short = spec.split('-')[0]
  name = model_name(short)
  filename = spec if '-' in spec else best_i21k(read_index(index or index_path()), short)
  return filename, name


def fetch(spec: str, *, dest: str = 'checkpoints',
          base_url: str = checkpoint.DEFAULT_BASE_URL, timeout: float = 10.0) -> str:
  """Downloads the checkpoint `spec` names into `dest/augreg/`; returns its local path."""
  filename, _ = resolve(spec, index_path(dest, base_url))
  return checkpoint.fetch(filename, bucket=BUCKET, dest=os.path.join(dest, BUCKET),
                          base_url=base_url, timeout=timeout)

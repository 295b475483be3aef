r"""Classifies image files with a trained model; prints the top-k classes of each image.

  python -m vit_jax.predict --checkpoint=WORKDIR --images=photo.jpg,more_photos/
  python -m vit_jax.predict --model=ViT-B_16 --checkpoint=ViT-B_16.npz --images=DIR \
      --labels=names.txt --top_k=5 --resolution=384

Class names: --labels (one per line, in class-index order), else the shipped list of the
workdir's dataset when there is one (vit_jax/labels/), else ImageNet-1k's for a 1000-class
`.npz` (the released fine-tuned checkpoints), else the class indices.
"""
import functools
import os
from typing import Optional, Sequence

from absl import flags
from absl import logging
import jax
import numpy as np

from vit_jax import cli
from vit_jax import inference
from vit_jax import output_check

LABELS_DIR = os.path.join(os.path.dirname(__file__), 'labels')
# Datasets whose class names ship with the package: dataset name -> file in LABELS_DIR.
DATASET_LABELS = {'fashion_mnist': 'fashion_mnist.txt', 'imagenet2012': 'imagenet2012.txt'}
IMAGENET_CLASSES = 1000


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defined by the program only, so that importing this module adds no flags elsewhere."""
  flags.DEFINE_string('checkpoint', None, 'A released-layout .npz or a training workdir.',
                      flag_values=fv)
  flags.DEFINE_string('model', None, 'Model name (vit_jax.model_configs); needed for a .npz.',
                      flag_values=fv)
  flags.DEFINE_list('images', None, 'Image files and/or directories (searched recursively).',
                    flag_values=fv)
  flags.DEFINE_string('labels', None, 'Text file of class names, one per line.', flag_values=fv)
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.', lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('resolution', None, 'Input resolution (default: the checkpoint\'s); '
                       'position embeddings are resized to fit.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.', lower_bound=1,
                       flag_values=fv)
  flags.mark_flags_as_required(['checkpoint', 'images'], flag_values=fv)


def read_labels(path: str) -> list[str]:
  with open(path) as f:
    labels = [line.strip() for line in f]
  while labels and not labels[-1]:
    labels.pop()
  return labels


def class_names(loaded: inference.LoadedModel, labels_path: Optional[str]) -> list[str]:
  """Names of the model's classes; raises when a labels file has the wrong length."""
  if loaded.run_config is not None:
    dataset = loaded.run_config.get('dataset')
  else:
    dataset = 'imagenet2012' if loaded.num_classes == IMAGENET_CLASSES else None
  if labels_path is None and dataset in DATASET_LABELS:
    labels_path = os.path.join(LABELS_DIR, DATASET_LABELS[dataset])
  if labels_path is None:
    return [str(i) for i in range(loaded.num_classes)]
  labels = read_labels(labels_path)
  if len(labels) != loaded.num_classes:
    raise ValueError(f'Labels file {labels_path} has {len(labels)} names but the model has '
                     f'{loaded.num_classes} classes.')
  return labels


def check_head(loaded: inference.LoadedModel) -> bool:
  """Warns when the classification head is all zeros (the released ImageNet-21k files): every
  image then gets the same, uniform prediction."""
  head = loaded.params.get('head')
  if head is None or any(np.any(np.asarray(v)) for v in head.values()):
    return True
  logging.warning(
      'The head of %s is all zeros (as in the released ImageNet-21k checkpoints): its '
      'predictions are uniform over the %d classes. Use it for features (the pre-logits, '
      'e.g. vit_jax.analyze) or fine-tune it first (python -m vit_jax.main '
      '--config=configs/vit.py:...).', loaded.source, loaded.num_classes)
  return False


def probabilities(loaded: inference.LoadedModel, images: np.ndarray,
                  batch_size: int) -> np.ndarray:
  """Softmax class probabilities [n, classes]; NonFiniteOutputError when a logit is not
  finite."""
  if not loaded.num_classes:
    raise ValueError(f'Checkpoint {loaded.source} has no classification head.')
  model = loaded.model
  forward = jax.jit(lambda params, x: model.apply({'params': params}, x, train=False))
  logits = inference.map_batches(functools.partial(forward, loaded.params), images, batch_size,
                                 desc='predict')
  output_check.check_finite(logits, f'Checkpoint {loaded.source}', model=model,
                            params=loaded.params, images=images)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
  """Indices [n, k] of the k most probable classes per row, most probable first."""
  return np.argsort(-probs, axis=-1, kind='stable')[:, :k]


def format_predictions(names: Sequence[str], probs: np.ndarray, labels: Sequence[str],
                       k: int) -> str:
  lines = []
  for name, row, best in zip(names, probs, top_k(probs, k)):
    lines.append(name)
    lines.extend(f'  {row[c]:.4f}  {labels[c]}' for c in best)
  return '\n'.join(lines)


def run(fv: flags.FlagValues) -> str:
  loaded = inference.load_model(fv.checkpoint, model_name=fv.model, resolution=fv.resolution)
  labels = class_names(loaded, fv.labels)
  check_head(loaded)
  run_pp = loaded.run_config.pp if loaded.run_config is not None else None
  names, images = inference.load_images(fv.images, loaded.resolution, run_pp)
  return format_predictions(names, probabilities(loaded, images, fv.batch_size), labels,
                            fv.top_k)


def main(argv: Sequence[str]) -> None:
  cli.check_no_arguments(argv)
  print(run(flags.FLAGS))


if __name__ == '__main__':
  define_flags()
  cli.run(main)

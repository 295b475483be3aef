"""The Python API for notebooks: a checkpoint in one line, class names in another.

    import vit_jax
    model, params, preprocess = vit_jax.load('ViT-B_16')    # or a .npz path, or a workdir
    logits = model.apply({'params': params}, preprocess(['cat.jpg']), train=False)
    vit_jax.classify('ViT-B_16', ['cat.jpg', 'photos/'])     # [[(class name, probability), ...]]

A released name is fetched into `checkpoints/` unless it is there; `preprocess` is predict's, so
notebook and command see the same pixels.
"""
import functools
import os
from typing import Optional, Sequence, Union

import numpy as np

from vit_jax import checkpoint
from vit_jax import inference
from vit_jax import model_configs

Images = Union[str, Sequence[str], np.ndarray]


class Model(tuple):
  """(model, params, preprocess), to unpack; also `.class_names`, `.resolution` and `.loaded`."""

  def __new__(cls, loaded: inference.LoadedModel, labels: Optional[str] = None):
    preprocess = functools.partial(_preprocess, resolution=loaded.resolution, pp=loaded.pp)
    self = super().__new__(cls, (loaded.model, loaded.params, preprocess))
    self.loaded = loaded
    self.resolution = loaded.resolution
    self.class_names = inference.class_names(loaded, labels) if loaded.num_classes else []
    return self


def _preprocess(images: Images, *, resolution: int, pp=None) -> np.ndarray:
  """Image files / directories -> float32 [n, R, R, 3] as the run's eval pipeline (`pp`) makes
  them; an array is taken as already preprocessed."""
  if isinstance(images, np.ndarray):
    return images
  return inference.load_images([images] if isinstance(images, str) else list(images),
                               resolution, pp)[1]


def resolve(name_or_path: str, *, bucket: str = 'imagenet21k',
            checkpoints_dir: str = 'checkpoints') -> tuple[str, Optional[str]]:
  """(a local .npz or workdir, its model name or None for a workdir) for what the user named."""
  if os.path.isdir(name_or_path):
    return name_or_path, None
  if name_or_path.endswith('.npz'):
    stem = os.path.basename(name_or_path)[:-len('.npz')]
    return name_or_path, model_configs.get_model_config(stem).model_name
  if name_or_path.startswith(checkpoint.AUGREG_PREFIX):
    return checkpoint.fetch(name_or_path, dest=checkpoints_dir), checkpoint.resolve_augreg(
        name_or_path, checkpoint.augreg_index_path(checkpoints_dir))[1]
  model_name = model_configs.get_model_config(name_or_path).model_name
  return checkpoint.fetch(model_name, bucket=bucket, dest=checkpoints_dir), model_name


def load(name_or_path: str, *, model_name: Optional[str] = None,
         resolution: Optional[int] = None, labels: Optional[str] = None,
         bucket: str = 'imagenet21k', checkpoints_dir: str = 'checkpoints') -> Model:
  """A released name ('ViT-B_16' from `bucket`, 'augreg:B_16'), a `.npz` path (named as its
  model, else pass `model_name`) or a training workdir -> Model. `labels`: a file of class
  names (default: inference.class_names's)."""
  if model_name and name_or_path.endswith('.npz'):
    path = name_or_path
  else:
    path, model_name = resolve(name_or_path, bucket=bucket, checkpoints_dir=checkpoints_dir)
  loaded = inference.load_model(path, model_name=model_name, resolution=resolution)
  inference.check_head(loaded)
  return Model(loaded, labels)


def classify(model: Union[str, Model], images: Images, *, top_k: int = 5,
             batch_size: int = 32) -> list[list[tuple[str, float]]]:
  """The `top_k` (class name, probability) pairs of each image, most probable first; `model`
  is what `load` returned or what it takes."""
  model = model if isinstance(model, Model) else load(model)
  probs = inference.probabilities(model.loaded, model[2](images), batch_size)
  return [[(model.class_names[c], float(row[c])) for c in best]
          for row, best in zip(probs, inference.top_k(probs, top_k))]

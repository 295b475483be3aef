"""Inference, shared by the commands and the notebook API: a checkpoint argument -> a ready model;
image files -> arrays; class names, probabilities and the top classes.

A checkpoint argument is a released-layout `.npz` (with its model name) or a training workdir
(whose config.json names the model, the classes and the resolution), local or gs://.
"""
import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm

from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import model_configs
from vit_jax import models
from vit_jax import output_check
from vit_jax import preprocessing
from vit_jax import workdir as workdir_lib

LABELS_DIR = os.path.join(os.path.dirname(__file__), 'labels')
# Datasets whose class names ship with the package: dataset name -> file in LABELS_DIR.
DATASET_LABELS = {'fashion_mnist': 'fashion_mnist.txt', 'imagenet2012': 'imagenet2012.txt'}
IMAGENET_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model with its parameters, ready to be applied to images at `resolution`."""
  model_config: ml_collections.ConfigDict
  params: dict  # In the released layout, on the default device.
  resolution: int
  num_classes: int  # 0 when the checkpoint has no classification head.
  source: str  # The checkpoint argument, for messages.
  run_config: Optional[ml_collections.ConfigDict] = None  # The training config of a workdir.

  @property
  def name(self) -> str:
    return self.model_config.model_name

  @property
  def model(self) -> models.VisionTransformer:
    return models.build_model(self.model_config, self.num_classes)

  @property
  def has_class_token(self) -> bool:
    return model_configs.has_class_token(self.model_config)

  @property
  def pp(self) -> Optional[ml_collections.ConfigDict]:
    """The preprocessing the model was trained with (a workdir's); None for an .npz."""
    return self.run_config.pp if self.run_config is not None else None

  @property
  def grid(self) -> tuple[int, int]:
    """Patches per side seen by the transformer."""
    return model_configs.grid(self.model_config, self.resolution)


def load_model(checkpoint_arg: str, *, model_name: Optional[str] = None,
               resolution: Optional[int] = None) -> LoadedModel:
  """Loads a `.npz` checkpoint or a training workdir with its head, for `resolution` (default:
  the checkpoint's own; otherwise the position embeddings are resized). Raises ValueError when
  the checkpoint does not fit the model."""
  if workdir_lib.is_workdir(checkpoint_arg):
    run_config, model_config, npz_path = _read_workdir(checkpoint_arg, model_name)
  elif checkpoint_arg.endswith('.npz'):
    if not model_name:
      raise ValueError(f'Checkpoint {checkpoint_arg} is a .npz file: pass the model name '
                       '(--model) it was trained as.')
    run_config, npz_path = None, checkpoint_arg
    model_config = model_configs.get_model_config(model_name)
  else:
    raise ValueError(f'Checkpoint {checkpoint_arg!r} is neither a .npz file nor a training '
                     'workdir.')
  raw = checkpoint.load(npz_path)
  num_classes = raw['head']['kernel'].shape[-1] if 'head' in raw else 0
  if run_config is None and 'pre_logits' in raw and not model_config.representation_size:
    # Released pre-training checkpoints carry a pre_logits layer their model config leaves out.
    model_config.representation_size = raw['pre_logits']['kernel'].shape[-1]
  native = (run_config.pp.resolution if run_config is not None
            else _resolution_of_posemb(raw, model_config, npz_path))
  resolution = resolution or native
  stride = model_configs.token_stride(model_config)
  if resolution % stride:
    raise ValueError(f'Resolution {resolution} is not a multiple of {stride}, the pixels per '
                     f'token of {model_config.model_name}.')
  params = jax.device_put(checkpoint.load_pretrained(
      pretrained_path=npz_path, model_config=model_config, keep_head=True, loaded=raw,
      init_params=models.abstract_params(model_config, num_classes, resolution)))
  return LoadedModel(model_config, params, resolution, num_classes, checkpoint_arg, run_config)


def _read_workdir(workdir: str, model_name: Optional[str]):
  run_config, npz_path = workdir_lib.read_model_files(workdir)
  try:
    model_config = run_config.model
    # Inference reads the released layout (no scanned blocks) and sown attention weights (no
    # fused kernel): the plain model, whatever speed switches the run trained with.
    model_config.update(model_configs.SPEED_SWITCHES)
    resolution = run_config.pp.resolution
    if not isinstance(resolution, int) or resolution < 1:
      raise TypeError(f'pp.resolution={resolution!r} is not a positive integer')
    models.abstract_params(model_config, 1, resolution)  # load_model's build, named if it fails.
  except (TypeError, KeyError, AttributeError, ValueError) as e:
    raise ValueError(f'{workdir_lib.path(workdir, workdir_lib.CONFIG)} does not describe a model '
                     f'vit_jax can build (edited by hand?): {type(e).__name__}: {e}') from e
  trained = model_config.model_name
  if model_name and model_configs.canonical_name(model_name) != trained:
    raise ValueError(f'--model={model_name} but workdir {workdir} trained {trained}.')
  return run_config, model_config, npz_path


def _resolution_of_posemb(params, model_config, path: str) -> int:
  """The square input resolution a checkpoint's position embeddings were made for."""
  posemb = traverse_util.flatten_dict(params, sep='/').get(checkpoint.POSEMB_KEY)
  resolution = posemb is not None and model_configs.resolution_of_posemb(model_config,
                                                                          posemb.shape[1])
  if not resolution:
    raise ValueError(f'Checkpoint {path} does not fit model {model_config.model_name}: its '
                     f'position embeddings {None if posemb is None else posemb.shape} are not a '
                     'square grid of patches (+ class token: '
                     f'{model_configs.has_class_token(model_config)}).')
  return resolution


def list_image_files(paths: Sequence[str]) -> list[str]:
  """Image files named in `paths`: files as given, directories searched recursively (sorted)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      files.extend(sorted(
          os.path.join(root, name) for root, _, names in os.walk(path) for name in names
          if name.lower().endswith(input_pipeline.IMAGE_EXTENSIONS)))
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f'{path} is neither an image file nor a directory.')
  if not files:
    raise ValueError(f'No {"/".join(input_pipeline.IMAGE_EXTENSIONS)} images in '
                     f'{", ".join(paths)}.')
  return files


def load_images(paths: Sequence[str], resolution: int,
                pp: Optional[ml_collections.ConfigDict] = None) -> tuple[list[str], np.ndarray]:
  """(image files, float32 [n, R, R, 3] in [-1, 1]) for files/directories, decoded and
  preprocessed exactly as the eval pipeline of the run (`pp`, default: the fine-tuning recipe's)
  at R = `resolution` does. A file that cannot be decoded (empty, not an image, a dangling link)
  is skipped with a warning naming it; ValueError when none can be."""
  files, images, errors = [], [], []
  candidates = list_image_files(paths)
  pp = ml_collections.ConfigDict((pp or config_lib.base_config().pp).to_dict())
  pp.resolution = resolution
  for path in tqdm.tqdm(candidates, desc='images', disable=len(candidates) < 100):
    try:
      with open(path, 'rb') as f:
        images.append(preprocessing.eval_image(tf.constant(f.read()), pp).numpy())
    except (OSError, tf.errors.InvalidArgumentError) as e:
      errors.append(f'Cannot decode image file {path}: {getattr(e, "message", e)}')
      logging.warning('%s Skipping it.', errors[-1])
      continue
    files.append(path)
  if not images:
    raise ValueError(f'None of the {len(candidates)} image files in {", ".join(paths)} can be '
                     f'decoded; the first: {errors[0]}')
  return files, np.stack(images)


def map_batches(fn: Callable[[jax.Array], jax.Array], images: np.ndarray, batch_size: int,
                desc: Optional[str] = None) -> np.ndarray:
  """`fn` over `images` in batches of one fixed size (the last one padded, so `fn` compiles once),
  outputs concatenated along the batch axis."""
  batch_size = min(batch_size, len(images))
  outputs = []
  for start in tqdm.trange(0, len(images), batch_size, desc=desc,
                           disable=len(images) <= batch_size):
    batch = images[start:start + batch_size]
    count = len(batch)
    if count < batch_size:
      batch = np.pad(batch, [(0, batch_size - count)] + [(0, 0)] * (batch.ndim - 1))
    outputs.append(np.asarray(fn(batch))[:count])
  return np.concatenate(outputs)


def class_names(loaded: LoadedModel, labels_path: Optional[str]) -> list[str]:
  """Names of the model's classes; raises when a labels file has the wrong length."""
  if loaded.run_config is not None:
    dataset = loaded.run_config.get('dataset')
  else:
    dataset = 'imagenet2012' if loaded.num_classes == IMAGENET_CLASSES else None
  if labels_path is None and dataset in DATASET_LABELS:
    labels_path = os.path.join(LABELS_DIR, DATASET_LABELS[dataset])
  if labels_path is None:
    return [str(i) for i in range(loaded.num_classes)]
  with open(labels_path) as f:
    labels = [line.strip() for line in f.read().rstrip().splitlines()]
  if len(labels) != loaded.num_classes:
    raise ValueError(f'Labels file {labels_path} has {len(labels)} names but the model has '
                     f'{loaded.num_classes} classes.')
  return labels


def check_head(loaded: LoadedModel) -> bool:
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


def probabilities(loaded: LoadedModel, images: np.ndarray,
                  batch_size: int) -> np.ndarray:
  """Softmax class probabilities [n, classes]; NonFiniteOutputError when a logit is not
  finite."""
  if not loaded.num_classes:
    raise ValueError(f'Checkpoint {loaded.source} has no classification head.')
  model = loaded.model
  forward = jax.jit(lambda params, x: model.apply({'params': params}, x, train=False))
  logits = map_batches(functools.partial(forward, loaded.params), images, batch_size,
                       desc='predict')
  output_check.check_finite(logits, f'Checkpoint {loaded.source}', model=model,
                            params=loaded.params, images=images)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
  """Indices [n, k] of the k most probable classes per row, most probable first."""
  return np.argsort(-probs, axis=-1, kind='stable')[:, :k]

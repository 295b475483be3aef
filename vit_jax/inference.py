"""Shared by the inference commands: a checkpoint argument -> a ready model; image files -> arrays.

A checkpoint argument is either a released-layout `.npz` (the model name must then be given) or a
training workdir (ARCHITECTURE.md: `WORKDIR/model.npz` + `WORKDIR/config.json`, which names the
model, its config, the number of classes and the resolution).
"""
import dataclasses
import json
import math
import os
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from vit_jax import checkpoint
from vit_jax import model_configs
from vit_jax import models

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


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
    return has_class_token(self.model_config)

  @property
  def grid(self) -> tuple[int, int]:
    """Patches per side seen by the transformer."""
    size = self.resolution // token_stride(self.model_config)
    return size, size


def has_class_token(model_config) -> bool:
  return model_config.classifier in ('token', 'token_unpooled')


def token_stride(model_config) -> int:
  """Input pixels per transformer token along one side: the patch size, times the ResNet stem's
  total stride for hybrids (root conv + max pool = 4, then 2 per stage after the first); 1 for
  the ResNet alone, which has no tokens and pools its feature map at any resolution."""
  if model_config.get('transformer') is None:
    return 1
  patch = model_config.patches.size[0]
  if model_config.get('resnet') is None:
    return patch
  return patch * 4 * 2**max(len(model_config.resnet.num_layers) - 1, 0)


def load_model(checkpoint_arg: str, *, model_name: Optional[str] = None,
               resolution: Optional[int] = None) -> LoadedModel:
  """Loads a `.npz` checkpoint or a training workdir with its head, for `resolution` (default:
  the checkpoint's own; otherwise the position embeddings are resized). Raises ValueError when
  the checkpoint does not fit the model."""
  if os.path.isdir(checkpoint_arg):
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
  stride = token_stride(model_config)
  if resolution % stride:
    raise ValueError(f'Resolution {resolution} is not a multiple of {stride}, the pixels per '
                     f'token of {model_config.model_name}.')
  params = jax.device_put(checkpoint.load_pretrained(
      pretrained_path=npz_path, model_config=model_config, keep_head=True,
      init_params=abstract_params(model_config, num_classes, resolution)))
  return LoadedModel(model_config, params, resolution, num_classes, checkpoint_arg, run_config)


def _read_workdir(workdir: str, model_name: Optional[str]):
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'Workdir {workdir} has no config.json.')
  npz_path = os.path.join(workdir, 'model.npz')
  if not os.path.isfile(npz_path):
    raise FileNotFoundError(f'Workdir {workdir} has no model.npz (written when training ends).')
  with open(config_path) as f:
    run_config = ml_collections.ConfigDict(json.load(f))
  if 'model' not in run_config:
    raise ValueError(f'{config_path} has no `model` field: it is not a vit_jax training config.')
  if model_name and model_configs.ALIASES.get(model_name.lower(),
                                              model_name) != run_config.model_name:
    raise ValueError(f'--model={model_name} but workdir {workdir} trained '
                     f'{run_config.model_name}.')
  model_config = run_config.model
  # Inference reads the released layout (no scanned blocks) and sown attention weights (no fused
  # kernel): the plain model, whatever speed switches the run trained with.
  model_config.update(model_configs.SPEED_SWITCHES)
  return run_config, model_config, npz_path


def _resolution_of_posemb(params, model_config, path: str) -> int:
  """The square input resolution a checkpoint's position embeddings were made for."""
  posemb = traverse_util.flatten_dict(params, sep='/').get(checkpoint.POSEMB_KEY)
  tokens = 0 if posemb is None else posemb.shape[1] - has_class_token(model_config)
  grid = math.isqrt(max(tokens, 0))
  if not grid or grid * grid != tokens:
    shape = None if posemb is None else posemb.shape
    raise ValueError(f'Checkpoint {path} does not fit model {model_config.model_name}: its '
                     f'position embeddings {shape} are not a square grid of patches '
                     f'(+ class token: {has_class_token(model_config)}).')
  return grid * token_stride(model_config)


def abstract_params(model_config, num_classes: int, resolution: int):
  """The model's parameter tree as jax.ShapeDtypeStructs (nothing is allocated)."""
  model = models.build_model(model_config, num_classes)
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)['params']


def list_image_files(paths: Sequence[str]) -> list[str]:
  """Image files named in `paths`: files as given, directories searched recursively (sorted)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      files.extend(sorted(
          os.path.join(root, name) for root, _, names in os.walk(path) for name in names
          if name.lower().endswith(IMAGE_EXTENSIONS)))
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f'{path} is neither an image file nor a directory.')
  if not files:
    raise ValueError(f'No {"/".join(IMAGE_EXTENSIONS)} images in {", ".join(paths)}.')
  return files


def load_image(path: str, resolution: int) -> np.ndarray:
  """float32 [resolution, resolution, 3] in [-1, 1]; grayscale and RGBA become RGB."""
  try:
    with Image.open(path) as image:
      image = image.convert('RGB').resize((resolution, resolution), Image.BILINEAR)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'Cannot decode image file {path}: {e}') from e
  return np.asarray(image, np.float32) / 127.5 - 1.0


def load_images(paths: Sequence[str], resolution: int) -> tuple[list[str], np.ndarray]:
  """(image files, float32 [n, resolution, resolution, 3] in [-1, 1]) for files/directories."""
  files = list_image_files(paths)
  images = [load_image(f, resolution)
            for f in tqdm.tqdm(files, desc='images', disable=len(files) < 100)]
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
      batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:],
                                              batch.dtype)])
    outputs.append(np.asarray(fn(batch))[:count])
  return np.concatenate(outputs)


def run_command(run: Callable[[flags.FlagValues], str], argv: Sequence[str]) -> int:
  """The `main` of the inference commands: prints what `run(flags.FLAGS)` returns; a ValueError or
  FileNotFoundError (a bad checkpoint, image or argument) becomes one 'Error: ...' line on stderr
  and exit status 1 instead of a traceback."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}.')
  try:
    print(run(flags.FLAGS))
  except (ValueError, FileNotFoundError) as e:
    print(f'Error: {e}', file=sys.stderr)
    return 1
  return 0

"""Released `.npz` checkpoints: load, adapt to a model, save and fetch (command line:
vit_jax.weights).

The model's parameter tree is the released layout, so loading only unflattens the `/`-joined
keys; big_vision files are converted on load (`_from_big_vision`).
"""
import csv
import functools
import http.client
import io
import math
import os
import re
import types
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.ndimage
import tqdm

from vit_jax import model_configs
from vit_jax import models

POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
DEFAULT_BASE_URL = 'https://storage.googleapis.com/vit_models'
# Names in the buckets of the original release; `augreg` holds many more (see its index.csv).
RELEASED_NAMES = {
    'imagenet21k': ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14',
                    'R50+ViT-B_16', 'R26+ViT-B_32', 'R50+ViT-L_32'),
    'imagenet21k+imagenet2012': ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32',
                                 'ViT-B_16-224', 'ViT-L_16-224', 'R50+ViT-B_16'),
}
AUGREG = 'augreg'  # The AugReg bucket, and the folder under `dest` that its files go to.
BUCKETS = (*RELEASED_NAMES, AUGREG)

_GROUP_NORM_PARAM = re.compile(r'(^|/)gn[^/]*/(scale|bias)$')
_BIG_VISION_BLOCK_NAMES = {  # An encoder block's submodules: big_vision name -> released name.
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
_BIG_VISION_BLOCK = re.compile(
    rf'^(Transformer/encoderblock_\d+/)({"|".join(_BIG_VISION_BLOCK_NAMES)})/')
_SCANNED_BLOCK_PREFIX = 'Transformer/encoderblock/'


# Where an object appears only when its upload completes (and a rename would be a copy).
_OBJECT_STORES = ('gs://', 's3://')


class DownloadError(OSError):
  """A checkpoint could not be downloaded (offline, HTTP error or truncated transfer)."""


# ---------------------------------------------------------------------------------------------
# Reading and writing.


def gfile():
  """`tf.io.gfile`, imported on first use: the model, the trainer and the benchmark import
  without TensorFlow (accelerator images often lack it)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def load(path: str) -> Dict[str, Any]:
  """Reads an `.npz` checkpoint (local path, gs:// or any tf.io.gfile URL) as a nested dict of
  numpy arrays in the released layout. Pickled (object) arrays are refused, never unpickled."""
  if not gfile().exists(path):
    raise FileNotFoundError(f'Checkpoint {path} does not exist.')
  if gfile().isdir(path):
    raise IsADirectoryError(f'Checkpoint {path} is a directory; expected an .npz file.')
  with gfile().GFile(path, 'rb') as f:
    data = f.read()
  if not data.startswith(b'PK'):
    raise ValueError(f'Checkpoint {path} is not an .npz archive.')
  flat = {}
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      for key in npz.files:
        try:
          flat[key] = npz[key]
        except ValueError as e:
          if 'allow_pickle' not in str(e):
            raise ValueError(f'Checkpoint {path}: key {key!r} is corrupt: {e}') from e
          raise ValueError(f'Checkpoint {path}: key {key!r} holds a pickled object array, '
                           'which is refused (only numeric arrays are loaded).') from e
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise ValueError(f'Checkpoint {path} is truncated or not a valid .npz archive: {e}') from e
  _check_arrays(flat, path)
  flat = _from_big_vision(flat, path)
  check_weights(flat, f'Checkpoint {path}')
  return traverse_util.unflatten_dict(flat, sep='/')


def _check_arrays(flat: Mapping[str, np.ndarray], path: str) -> None:
  """ValueError naming the file and key of an array that cannot be a weight (a scalar, strings,
  complex numbers, raw bytes); arrays outside a big_vision file's `params/` are ignored."""
  used = {k: v for k, v in flat.items() if k.startswith('params/')} or flat
  for key, value in used.items():
    if value.dtype.kind in 'USVOc':
      raise ValueError(f'Checkpoint {path}: key {key!r} holds {value.dtype} values '
                       f'(shape {value.shape}); weights are float arrays.')
    if value.ndim == 0:
      raise ValueError(f'Checkpoint {path}: key {key!r} is a scalar (shape ()); weights are '
                       'arrays of at least one dimension.')


def check_weights(params: Mapping[str, Any], source: str) -> None:
  """ValueError (starting with `source`) unless every array of `params` (nested or `/`-flat) is
  floating-point and finite: integer weights are a wrong file, NaN or Inf ones a diverged run."""
  nested = any(isinstance(v, Mapping) for v in params.values())
  flat = traverse_util.flatten_dict(params, sep='/') if nested else dict(params)
  not_float = sorted(k for k, v in flat.items() if not jnp.issubdtype(v.dtype, jnp.floating))
  if not_float:
    raise ValueError(f'{source} holds non-floating-point weights in {_some_keys(not_float)} '
                     f'({flat[not_float[0]].dtype}, ...); expected float arrays.')
  non_finite = sorted(k for k, v in flat.items() if not _all_finite(v))
  if non_finite:
    raise ValueError(f'{source} holds NaN or Inf weights in {len(non_finite)} of {len(flat)} '
                     f'arrays: {_some_keys(non_finite)}. It cannot give meaningful outputs (was '
                     'it saved after training diverged?).')


def _all_finite(array) -> bool:
  if isinstance(array, np.ndarray):
    return bool(np.isfinite(array).all())
  return bool(jnp.isfinite(array).all())


def _some_keys(keys: Sequence[str], shown: int = 3) -> str:
  listing = ', '.join(keys[:shown])
  return listing + (f' and {len(keys) - shown} more' if len(keys) > shown else '')


def _from_big_vision(flat: Dict[str, np.ndarray], path: str) -> Dict[str, np.ndarray]:
  """Converts a flat big_vision tree to the released layout; other trees pass unchanged.

  big_vision keys may sit under `params/`, blocks may be scanned (a leading layer axis), block
  submodules are numbered from 0, and `pos_embedding` covers the patch grid only (added before
  the class token is prepended: the class token's row is zero in the released layout).
  """
  if any(k.startswith('params/') for k in flat):
    others = [k for k in flat if not k.startswith('params/')]
    if others:
      logging.info('%s: ignoring %d arrays outside params/ (e.g. %s).', path, len(others),
                   others[0])
    flat = {k[len('params/'):]: v for k, v in flat.items() if k.startswith('params/')}
  if any(k.startswith(_SCANNED_BLOCK_PREFIX) for k in flat):
    try:
      tree = models.unstack_encoder_blocks(traverse_util.unflatten_dict(flat, sep='/'))
    except ValueError as e:
      raise ValueError(f'Checkpoint {path}: {e}') from e
    flat = traverse_util.flatten_dict(tree, sep='/')
    logging.info('%s: unstacked the scanned big_vision encoder blocks.', path)
  if any(_BIG_VISION_BLOCK.match(k) for k in flat):
    flat = {_BIG_VISION_BLOCK.sub(lambda m: f'{m[1]}{_BIG_VISION_BLOCK_NAMES[m[2]]}/', k): v
            for k, v in flat.items()}
    logging.info('%s: renamed big_vision encoder-block modules to the released names.', path)
  if 'pos_embedding' in flat:
    posemb = flat.pop('pos_embedding')
    if 'cls' in flat:
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    flat[POSEMB_KEY] = posemb
  return flat


def save_npz(params: Mapping[str, Any], path: str) -> str:
  """Writes params (numpy or jax arrays, sharded ones included) atomically as a flat float32
  `.npz` with `/`-joined keys. Returns `path`."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v, dtype=np.float32) for k, v in flat.items()})
  write_atomically(path, buffer.getvalue())
  logging.info('Saved %d arrays to %s.', len(flat), path)
  return path


def write_atomically(path: str, data) -> None:
  """Writes `data` (bytes or str) to `path` (local, without TensorFlow, or a tf.io.gfile URL) so
  that a reader finds the old file or the new one, never a part: written beside it and renamed,
  except on an object store, which publishes an object only when its upload completes."""
  local = '://' not in path
  fs = _LOCAL_FILES if local else gfile()
  directory = os.path.dirname(path)
  if directory:
    fs.makedirs(directory)
  target = path if path.startswith(_OBJECT_STORES) else f'{path}.tmp-{os.getpid()}'
  try:
    with (open if local else fs.GFile)(target, 'wb' if isinstance(data, bytes) else 'w') as f:
      f.write(data)
    if target != path:
      fs.rename(target, path, overwrite=True)
  finally:
    if target != path and fs.exists(target):
      fs.remove(target)


# The tf.io.gfile calls write_atomically makes, for local paths.
_LOCAL_FILES = types.SimpleNamespace(
    makedirs=functools.partial(os.makedirs, exist_ok=True), exists=os.path.exists,
    remove=os.remove, rename=lambda source, target, overwrite: os.replace(source, target))


# ---------------------------------------------------------------------------------------------
# Adapting a checkpoint to a model.


def load_pretrained(*, pretrained_path: str, init_params: Any,
                    model_config: ml_collections.ConfigDict, keep_head: bool = False,
                    loaded: Optional[Mapping[str, Any]] = None) -> Any:
  """Checkpoint params adapted to a model, as numpy arrays in the structure of `init_params`.
  `loaded`: the file as `load(pretrained_path)` already returned it (not read again).

  The head is the model's (`init_params`) or with `keep_head` the checkpoint's; `pre_logits` is
  dropped when `representation_size` is None; the position-embedding grid is resized; legacy
  GroupNorm params (1, 1, 1, C) become (C,). Anything else that does not match is one ValueError
  listing every missing, unexpected and mis-shaped key.
  """
  model = traverse_util.flatten_dict(init_params, sep='/')
  checkpoint = traverse_util.flatten_dict(
      load(pretrained_path) if loaded is None else loaded, sep='/')
  adapted, legacy_group_norm = {}, 0
  for key, value in checkpoint.items():
    if key.startswith('head/') and not keep_head:
      continue
    if key.startswith('pre_logits/') and model_config.get('representation_size') is None:
      logging.info('Dropping %s from %s (representation_size is None).', key, pretrained_path)
      continue
    if _is_legacy_group_norm(key, value.shape):
      value = value.reshape(value.shape[-1])
      legacy_group_norm += 1
    adapted[key] = value
  if legacy_group_norm:
    logging.info('Reshaped %d legacy GroupNorm params (1, 1, 1, C) -> (C,).', legacy_group_norm)
  if not keep_head:
    adapted.update({k: v for k, v in model.items() if k.startswith('head/')})
  _check_fits(adapted, model, pretrained_path, model_config)
  if POSEMB_KEY in model and adapted[POSEMB_KEY].shape != model[POSEMB_KEY].shape:
    old = adapted[POSEMB_KEY]
    adapted[POSEMB_KEY] = resize_posemb(
        old, model[POSEMB_KEY].shape[1],
        has_class_token=model_configs.has_class_token(model_config))
    logging.info('Resized position embeddings %s -> %s.', old.shape, model[POSEMB_KEY].shape)
  logging.info('Loaded %s; head %s.', pretrained_path,
               'from the checkpoint' if keep_head else 'from the model initialisation')
  return traverse_util.unflatten_dict(
      {k: np.asarray(adapted[k], dtype=leaf.dtype) for k, leaf in model.items()}, sep='/')


def _check_fits(checkpoint: Mapping[str, Any], model: Mapping[str, Any], path: str,
                model_config: ml_collections.ConfigDict) -> None:
  """Raises one ValueError listing every key that keeps `checkpoint` from loading into `model`.
  The position embedding only needs the same hidden size."""
  problems = [f'missing from checkpoint: {key} (model {tuple(model[key].shape)})'
              for key in sorted(model.keys() - checkpoint.keys())]
  problems += [f'unexpected in checkpoint: {key} {tuple(checkpoint[key].shape)}'
               for key in sorted(checkpoint.keys() - model.keys())]
  for key in sorted(checkpoint.keys() & model.keys()):
    have, want = tuple(checkpoint[key].shape), tuple(model[key].shape)
    resizable = (key == POSEMB_KEY and len(have) == len(want) == 3
                 and have[::2] == want[::2])
    if have != want and not resizable:
      problems.append(f'shape mismatch: {key}: checkpoint {have} vs model {want}')
  if not problems:
    return
  representation_size = model_config.get('representation_size')
  if 'pre_logits/kernel' in model and 'pre_logits/kernel' not in checkpoint:
    problems.append(f'hint: the checkpoint has no pre_logits; set representation_size=None '
                    f'(it is {representation_size}).')
  elif 'pre_logits/kernel' in model and any('pre_logits/' in p for p in problems):
    problems.append(f'hint: the checkpoint\'s pre_logits has size '
                    f'{checkpoint["pre_logits/kernel"].shape[-1]}; set representation_size to '
                    f'that or None (it is {representation_size}).')
  match = match_model_config({k: v.shape for k, v in checkpoint.items()})
  if match:
    problems.append(f'hint: the checkpoint fits model config {match[0]!r}.')
  raise ValueError(f'Checkpoint {path} does not fit the model {model_config.get("model_name")!r}:'
                   '\n  ' + '\n  '.join(problems))


def resize_posemb(posemb: np.ndarray, num_tokens: int, *, has_class_token: bool) -> np.ndarray:
  """Resizes (1, tokens, D) position embeddings to `num_tokens` tokens by linear interpolation
  of the square patch grid, as the official code (zoom, order 1), keeping the class token's row.
  mode='nearest' keeps the last row where rounding puts a coordinate a hair past the grid
  (e.g. 8 -> 26), which zoom's default mode='constant' zeroes."""
  prefix = 1 if has_class_token else 0
  old_size = _grid_size(posemb.shape[1] - prefix, 'checkpoint', has_class_token)
  new_size = _grid_size(num_tokens - prefix, 'model', has_class_token)
  grid = np.asarray(posemb[0, prefix:], np.float64).reshape(old_size, old_size, -1)
  zoom = new_size / old_size
  grid = scipy.ndimage.zoom(grid, (zoom, zoom, 1), order=1, mode='nearest')
  grid = grid.reshape(1, new_size * new_size, -1).astype(posemb.dtype)
  return np.concatenate([posemb[:, :prefix], grid], axis=1)


def _grid_size(num_patches: int, whose: str, has_class_token: bool) -> int:
  size = math.isqrt(num_patches)
  if size * size != num_patches:
    raise ValueError(
        f'The {whose} position embedding has {num_patches} patch tokens (class token '
        f'{"excluded" if has_class_token else "absent"}), which is not a square grid; only '
        'square grids can be resized.')
  return size


def _is_legacy_group_norm(key: str, shape: Sequence[int]) -> bool:
  return bool(_GROUP_NORM_PARAM.search(key)) and len(shape) == 4 and tuple(shape[:3]) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Recognising the model config of a tree.


def match_model_config(
    flat_shapes: Mapping[str, Sequence[int]]) -> Optional[Tuple[str, Optional[int], Optional[int]]]:
  """(name, num_classes, resolution) of the first MODEL_CONFIGS entry whose parameter shapes the
  flat tree has, ignoring the head, pre_logits and the position-embedding length (None for
  num_classes without a head, for resolution off a square grid)."""
  shapes = {k: tuple(s[-1:]) if _is_legacy_group_norm(k, s) else tuple(s)
            for k, s in flat_shapes.items()
            if not k.startswith(('head/', 'pre_logits/'))}
  if 'embedding/kernel' not in shapes or POSEMB_KEY not in shapes:
    return None
  summary = _summary_of_shapes(shapes)
  for name, config in model_configs.MODEL_CONFIGS.items():
    if _summary(config) != summary:
      continue  # Cheap rejection before building the model's full shape tree.
    expected = _config_shapes(name)
    posemb, expected_posemb = shapes[POSEMB_KEY], expected[POSEMB_KEY]
    if (shapes.keys() != expected.keys() or len(posemb) != 3 or posemb[::2] != expected_posemb[::2]
        or any(shapes[k] != expected[k] for k in expected if k != POSEMB_KEY)):
      continue
    head = flat_shapes.get('head/bias')
    num_classes = int(head[0]) if head is not None else None
    return name, num_classes, model_configs.resolution_of_posemb(config, posemb[1])
  return None


def _summary(config: ml_collections.ConfigDict) -> tuple:
  resnet = tuple(config.resnet.num_layers) if config.resnet is not None else None
  if config.transformer is None:  # The ResNet alone: no patch embedding to match a ViT tree by.
    return (None, None, None, resnet)
  return (tuple(config.patches.size), config.hidden_size, config.transformer.num_layers, resnet)


def _summary_of_shapes(shapes: Mapping[str, Tuple[int, ...]]) -> tuple:
  kernel = shapes['embedding/kernel']
  num_layers = len({k.split('/')[1] for k in shapes if k.startswith('Transformer/encoderblock_')})
  resnet = None
  if 'conv_root/kernel' in shapes:
    units = {}
    for key in shapes:
      if match := re.match(r'block(\d+)/unit(\d+)/', key):
        stage, unit = map(int, match.groups())
        units[stage] = max(units.get(stage, 0), unit)
    resnet = tuple(units[s] for s in sorted(units))
  return (tuple(kernel[:2]), kernel[-1], num_layers, resnet)


@functools.lru_cache(maxsize=None)
def _config_shapes(name: str) -> Dict[str, Tuple[int, ...]]:
  """Parameter shapes of MODEL_CONFIGS[name] without head, on a 2x2 patch grid."""
  config = model_configs.get_model_config(name)
  config.representation_size = None
  size = 2 * model_configs.token_stride(config)
  params = models.abstract_params(config, None, size)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep='/').items()}


# ---------------------------------------------------------------------------------------------
# Downloading released checkpoints.


def checkpoint_url(name: str, bucket: str, base_url: str = DEFAULT_BASE_URL) -> str:
  """HTTPS URL of a released checkpoint; raises ValueError for unknown buckets or names."""
  if bucket not in BUCKETS:
    raise ValueError(f'Unknown bucket {bucket!r}; expected one of {", ".join(BUCKETS)}.')
  known = RELEASED_NAMES.get(bucket)
  if known is not None and name not in known:
    raise ValueError(f'Unknown checkpoint {name!r} in bucket {bucket}; '
                     f'known names: {", ".join(known)}.')
  if not re.fullmatch(r'[\w.+=-]+', name):
    raise ValueError(f'Invalid checkpoint name {name!r} (a file name without .npz is expected).')
  return f'{base_url.rstrip("/")}/{urllib.parse.quote(f"{bucket}/{name}.npz")}'


def fetch(name: str, *, bucket: str = 'imagenet21k', dest: str = 'checkpoints',
          base_url: str = DEFAULT_BASE_URL, timeout: float = 10.0) -> str:
  """Downloads `<base_url>/<bucket>/<name>.npz` to `<dest>/<name>.npz` unless it is there;
  returns the local path. 'augreg:SPEC' (`resolve_augreg`) goes to `<dest>/augreg/`."""
  if name.startswith(AUGREG_PREFIX):
    filename, _ = resolve_augreg(name, augreg_index_path(dest, base_url))
    return fetch(filename, bucket=AUGREG, dest=os.path.join(dest, AUGREG), base_url=base_url,
                 timeout=timeout)
  name = name.removesuffix('.npz')
  url = checkpoint_url(name, bucket, base_url)
  path = os.path.join(dest, f'{name}.npz')
  if os.path.exists(path):
    logging.info('%s already exists; not downloading it again.', path)
    return path
  os.makedirs(dest, exist_ok=True)
  try:
    return download(url, path, timeout=timeout)
  except DownloadError as e:
    raise DownloadError(
        f'{e}\nIf this machine is offline, copy the file by hand, e.g.\n'
        f'  gsutil cp "gs://vit_models/{bucket}/{name}.npz" {dest}/\n'
        f'  curl -o "{path}" "{checkpoint_url(name, bucket)}"') from e


def download(url: str, path: str, *, timeout: float = 10.0, chunk_size: int = 1 << 20) -> str:
  """Streams `url` to `path.part` with a progress bar, checks the size against Content-Length
  and renames to `path`. Raises DownloadError (and leaves no file) on any failure."""
  part = f'{path}.part'
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      length = response.headers.get('Content-Length')
      expected = int(length) if length is not None else None
      if expected is None:
        logging.warning('%s sent no Content-Length; the size cannot be checked.', url)
      received = 0
      with open(part, 'wb') as f, tqdm.tqdm(total=expected, unit='B', unit_scale=True,
                                            desc=os.path.basename(path)) as progress:
        while chunk := response.read(chunk_size):
          f.write(chunk)
          received += len(chunk)
          progress.update(len(chunk))
    if expected is not None and received != expected:
      raise DownloadError(f'Download of {url} is truncated: received {received} of {expected} '
                          'bytes (Content-Length).')
    os.replace(part, path)
  except (OSError, http.client.HTTPException) as e:  # URLError is an OSError.
    if os.path.exists(part):
      os.remove(part)
    if isinstance(e, DownloadError):
      raise
    raise DownloadError(f'Could not download {url}: {e}') from e
  logging.info('Downloaded %s (%d bytes) to %s.', url, received, path)
  return path


# ---------------------------------------------------------------------------------------------
# AugReg checkpoints ("How to train your ViT?"). As in the official configs/augreg.py, a short
# name ('B_16', 'R26_S_32') stands for that model's i21k pre-training (`ds`) with the best
# `final_val` in the bucket's index.csv (`filename`: augreg/<filename>.npz); a full filename
# ('B_16-i21k-300ep-lr_0.001-...') stands for itself.

AUGREG_PREFIX = 'augreg:'


def augreg_model_name(short: str) -> str:
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


def augreg_index_path(dest: str = 'checkpoints', base_url: str = DEFAULT_BASE_URL) -> str:
  """The local copy of the bucket's index.csv (`dest/augreg/index.csv`), fetched once."""
  path = os.path.join(dest, AUGREG, 'index.csv')
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    download(f'{base_url.rstrip("/")}/{AUGREG}/index.csv', path)
  return path


def _best_augreg_i21k(index: str, short: str) -> str:
  """The filename of `short`'s i21k pre-training with the highest final_val."""
  with open(index, newline='') as f:
    rows = list(csv.DictReader(f))
  missing = {'ds', 'final_val', 'filename'} - set(rows[0] if rows else ())
  if missing:
    raise ValueError(f'{index} is not an AugReg index.csv: no column(s) {sorted(missing)}.')
  candidates = [r for r in rows if r['filename'].split('-')[0] == short and r['ds'] == 'i21k']
  if not candidates:
    known = sorted({r['filename'].split('-')[0] for r in rows})
    raise ValueError(f'No i21k AugReg checkpoint of {short!r}; the index has {", ".join(known)}.')
  return max(candidates, key=lambda r: float(r['final_val']))['filename']


def resolve_augreg(spec: str, index: Optional[str] = None) -> tuple[str, str]:
  """('augreg:')SHORT or a full filename -> (filename without .npz, our model name)."""
  spec = spec.removeprefix(AUGREG_PREFIX)
  short = spec.split('-')[0]
  name = augreg_model_name(short)
  filename = spec if '-' in spec else _best_augreg_i21k(index or augreg_index_path(), short)
  return filename, name

"""Input pipeline: TFDS datasets or image folders -> host-local numpy batches -> global jax.Arrays.

`config.dataset` is a TFDS name with `image` and `label` features (prepared into
`config.data_dir` on first use; `DatasetUnavailable` says what would fix a failure),
`fashion_mnist` (built offline from the Debian IDX files when present, `vit_jax.fashion_mnist`),
or `folder:/path`, one sub-folder of images per class: with /path/train and /path/test (or val,
validation) those are the splits, else 'test' is a stratified `config.folder_test_fraction` of
each class. Undecodable files are skipped with one warning.

Training reads one shard per device, each shuffled per epoch and every example augmented with
seeds derived from (config.seed, shard, position), so the global stream depends only on (config,
device count), not on the processes, and resuming skips undecoded records. Datasets whose
decoded images fit in `_AUTO_CACHE_BYTES` are decoded once (`config.cache` forces it either way).
Decoding and pixels: `vit_jax.preprocessing`. Images are float32 in [-1, 1], labels int32.
"""
import collections
import dataclasses
import functools
import hashlib
import itertools
import math
import os
from typing import Iterator, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import cli
from vit_jax import config_lib
from vit_jax import fashion_mnist
from vit_jax import preprocessing


FOLDER_PREFIX = 'folder:'
# Image files of folder datasets and of the inference commands: what both tf.io.decode_image
# (here) and PIL (vit_jax.inference) decode.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
_EVAL_SPLIT_NAMES = ('test', 'val', 'validation')
_AUTO_CACHE_BYTES = 2 << 30
_MAX_NAMED_FILES = 50  # Undecodable files named in the warning.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int  # Of config.train_split.
  num_eval_examples: int  # Of config.eval_split.


@dataclasses.dataclass(frozen=True)
class _Shard:
  records: tf.data.Dataset  # (undecoded image, label) pairs, in a fixed order.
  num_examples: int


class _TfdsSource:
  """A prepared TFDS dataset with `image` and `label` features."""

  def __init__(self, builder: tfds.core.DatasetBuilder):
    self._builder = builder
    self.num_classes = builder.info.features['label'].num_classes
    self.image_shape = builder.info.features['image'].shape

  def shard(self, split: str, index: int, count: int) -> _Shard:
    ds = self._builder.as_dataset(
        split=tfds.split_for_jax_process(split, process_index=index, process_count=count),
        shuffle_files=False, decoders=tfds.decode.PartialDecoding(
            {'image': True, 'label': True}, decoders={'image': tfds.decode.SkipDecoding()}))
    if ds.cardinality() < 0:
      raise ValueError(f'The number of examples of {self._builder.name} {split} is unknown.')
    return _Shard(ds.map(lambda ex: (ex['image'], ex['label'])), int(ds.cardinality()))

  read = staticmethod(tf.identity)  # Records hold the encoded image.


class _FolderSource:
  """A folder of class sub-folders (see the module docstring for the split rules)."""

  image_shape = (None, None, 3)

  def __init__(self, root: str, test_fraction: float):
    self._root = root
    self.class_names, self._splits = _list_folder(os.path.abspath(root), test_fraction)
    self.num_classes = len(self.class_names)

  def shard(self, split: str, index: int, count: int) -> _Shard:
    files = self._files(split)
    size, remainder = divmod(len(files), count)  # Like tfds.even_splits: first shards get +1.
    start = index * size + min(index, remainder)
    shard = files[start:start + size + (index < remainder)]
    records = tf.data.Dataset.from_tensor_slices(
        ([path for path, _ in shard], np.array([label for _, label in shard], np.int64)))
    return _Shard(records, len(shard))

  def _files(self, split: str) -> list[tuple[str, int]]:
    """The files of a split in TFDS syntax ('train', 'train[:98%]', 'train[98%:]+test'), with
    TFDS' rounding; any eval name stands for the folder's eval split."""
    eval_name = next((name for name in _EVAL_SPLIT_NAMES if name in self._splits), None)
    resolve = {**{alias: eval_name for alias in _EVAL_SPLIT_NAMES if eval_name},
               **{name: name for name in self._splits}}
    infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[len(self._splits[target])],
                                       num_bytes=0, filename_template=None)
             for name, target in resolve.items()}
    try:
      parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    except (ValueError, KeyError) as e:
      raise ValueError(f'Unknown split {split!r} of {FOLDER_PREFIX}{self._root}: it has '
                       f'{sorted(self._splits)} (and the aliases {_EVAL_SPLIT_NAMES}), sliced '
                       "as in TFDS, e.g. 'train[:98%]'.") from e
    return [file for part in parts
            for file in self._splits[resolve[part.splitname]][part.from_:part.to]]

  read = staticmethod(tf.io.read_file)  # Records hold the path, read only when decoded.


def _get_source(config):
  if config.dataset.startswith(FOLDER_PREFIX):
    return _FolderSource(config.dataset[len(FOLDER_PREFIX):], config.folder_test_fraction)
  builder = _tfds_builder(config.dataset, config.data_dir)
  if not builder.is_prepared():
    _prepare(builder, config.tfds_manual_dir)
  return _TfdsSource(builder)


class DatasetUnavailable(cli.UserError):
  """A TFDS dataset could not be prepared (no network, the manual files missing)."""


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: Optional[str]) -> None:
  """Downloads and prepares `builder` into its data_dir (TFDS' progress bars show); raises
  DatasetUnavailable saying what would fix a failure."""
  name, root = builder.info.full_name, builder.data_dir_root
  logging.info('Preparing TFDS dataset %s in %s (once; later runs read it from there).', name,
               root)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except  # Network, archives, manual files.
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      fix = (f'its files must be downloaded by hand into config.tfds_manual_dir (now '
             f'{manual_dir}): {" ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
    else:
      fix = (f'on a machine with a network run `tfds build {builder.name} --data_dir={root}` and '
             f'copy {root}/{builder.name} here')
    raise DatasetUnavailable(
        f'Cannot prepare TFDS dataset {name!r} in data_dir {root} ({type(e).__name__}: '
        f'{" ".join(str(e).split())[:300]}); {fix}.') from e


def check_and_complete(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
  """Validates `config` for this process's devices (config_lib.validate) and against the
  dataset's own facts (`check_against_data`), and fills num_classes from the dataset: once per
  run, before anything is written or compiled."""
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  info = get_dataset_info(config)
  check_against_data(config, info, num_shards=jax.device_count(), training=training)
  config.num_classes = config.num_classes or info.num_classes


def check_against_data(config: ml_collections.ConfigDict, info: DatasetInfo, *, num_shards: int,
                       training: bool) -> None:
  """ValueError naming the field for what the data cannot satisfy (fewer head classes than
  labels, fewer training examples than data shards); warnings for what runs but means little (one
  class, head classes no label uses, a batch larger than the split)."""
  name = f'{config.dataset!r}'
  if config.num_classes and config.num_classes < info.num_classes:
    raise ValueError(
        f'config.num_classes={config.num_classes} but {name} has {info.num_classes} classes '
        f'(labels 0 to {info.num_classes - 1}): a head of {config.num_classes} cannot learn them. '
        'Leave config.num_classes unset to take the dataset\'s.')
  if config.num_classes and config.num_classes > info.num_classes:
    logging.warning('config.num_classes=%d but %s has %d classes: the head\'s other %d classes '
                    'never occur.', config.num_classes, name, info.num_classes,
                    config.num_classes - info.num_classes)
  if info.num_classes == 1:
    logging.warning('%s has one class only: every prediction is that class and accuracy is 1.0 '
                    'whatever the model. (A folder dataset needs one sub-folder per class.)',
                    name)
  if not training:
    return
  if info.num_train_examples < num_shards:
    raise ValueError(
        f'config.train_split={config.train_split!r} selects {info.num_train_examples} examples '
        f'of {name}, fewer than the {num_shards} devices that each read a shard of it.')
  if info.num_train_examples < config.batch:
    logging.warning('config.batch=%d is larger than config.train_split=%r (%d examples of %s): '
                    'every batch repeats examples.', config.batch, config.train_split,
                    info.num_train_examples, name)


def _tfds_builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  if name == 'fashion_mnist' and fashion_mnist.is_available():
    return fashion_mnist.prepared_builder(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown dataset {name!r}: neither a TFDS name nor '
                     f'{FOLDER_PREFIX}/path/to/images.') from e
  features = builder.info.features
  keys = features.keys() if isinstance(features, tfds.features.FeaturesDict) else ()
  if not ('image' in keys and isinstance(features['image'], tfds.features.Image) and
          'label' in keys and isinstance(features['label'], tfds.features.ClassLabel)):
    raise ValueError(f'Dataset {name!r} needs an `image` (Image) and a `label` (ClassLabel) '
                     f'feature; it has {features}.')
  return builder


@functools.lru_cache(maxsize=None)
def _list_folder(root: str, test_fraction: float):
  """(class names, {split: [(path, label)]}) without undecodable files, listed once per
  process: later changes to the folder are not seen."""
  if not os.path.isdir(root):
    raise ValueError(f'Image folder {root} does not exist.')
  if os.path.isdir(os.path.join(root, 'train')):
    eval_splits = [name for name in _EVAL_SPLIT_NAMES if os.path.isdir(os.path.join(root, name))]
    if not eval_splits:
      raise ValueError(f'{root} has a train/ folder but none of {_EVAL_SPLIT_NAMES}.')
    class_names = _class_names(os.path.join(root, 'train'))
    splits = {name: _list_images(os.path.join(root, name), class_names)
              for name in ['train'] + eval_splits}
  else:
    class_names = _class_names(root)
    splits = _split_by_fraction(_list_images(root, class_names), root, test_fraction)
  splits = _drop_undecodable(splits, root)
  for split, files in splits.items():
    if not files:
      raise ValueError(f'Split {split!r} of image folder {root} has no decodable images.')
  return class_names, splits


def _class_names(folder: str) -> tuple[str, ...]:
  names = tuple(sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()))
  if not names:
    raise ValueError(f'Image folder {folder} has no class sub-folders.')
  return names


def _list_images(folder: str, class_names: tuple[str, ...]) -> list[tuple[str, int]]:
  """(path, label) of every image in `folder`'s class sub-folders, in a stable shuffled order."""
  files = []
  for class_name in _class_names(folder):
    class_dir = os.path.join(folder, class_name)
    if class_name not in class_names:
      raise ValueError(f'Class folder {class_dir} is not one of the training classes '
                       f'{class_names}.')
    paths = [entry.path for entry in os.scandir(class_dir)
             if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
      raise ValueError(f'Class folder {class_dir} has no {"/".join(IMAGE_EXTENSIONS)} images.')
    files.extend((path, class_names.index(class_name)) for path in paths)
  return sorted(files, key=lambda file: hashlib.md5(
      os.path.relpath(file[0], folder).encode()).hexdigest())


def _split_by_fraction(files, root: str, test_fraction: float):
  """Puts the first ceil(test_fraction * n) files of each class (in hash order) in 'test'."""
  if not 0 < test_fraction < 1:
    raise ValueError(f'config.folder_test_fraction must be in (0, 1) for {root} (it has no '
                     f'train/ and test/ folders); got {test_fraction}.')
  class_sizes = np.bincount([label for _, label in files])
  seen = np.zeros_like(class_sizes)
  splits = {'train': [], 'test': []}
  for path, label in files:
    in_test = seen[label] < math.ceil(test_fraction * class_sizes[label])
    splits['test' if in_test else 'train'].append((path, label))
    seen[label] += 1
  return splits


def _drop_undecodable(splits, root: str):
  """Decodes every file once with the pipeline's decoder; drops and names the failures."""
  paths = [path for files in splits.values() for path, _ in files]
  checks = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
      lambda i, path: (i, tf.shape(preprocessing.decode(tf.io.read_file(path)))),
      num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  decoded = {int(i) for i, _ in checks.as_numpy_iterator()}
  bad = {path for i, path in enumerate(paths) if i not in decoded}
  if bad:
    named = sorted(os.path.relpath(path, root) for path in bad)
    more = f' and {len(named) - _MAX_NAMED_FILES} more' if len(named) > _MAX_NAMED_FILES else ''
    logging.warning('Skipping %d undecodable image file(s) in %s: %s%s', len(bad), root,
                    ', '.join(named[:_MAX_NAMED_FILES]), more)
  return {split: [file for file in files if file[0] not in bad]
          for split, files in splits.items()}


def get_dataset_info(config) -> DatasetInfo:
  source = _get_source(config)
  return DatasetInfo(
      num_classes=source.num_classes,
      num_train_examples=_split_size(source, config, 'train_split'),
      num_eval_examples=_split_size(source, config, 'eval_split'))


def _split_size(source, config, field: str) -> int:
  """Examples in `config[field]`; ValueError naming the field when it selects none."""
  split = config[field]
  try:
    size = source.shard(split, 0, 1).num_examples
  except ValueError as e:
    if 'corresponds to no data' not in str(e):  # TFDS, for an empty slice such as 'train[:0]'.
      raise
    size = 0
  if not size:
    raise ValueError(f'config.{field}={split!r} selects no examples of {config.dataset!r}.')
  return size


def build_train_iterator(config, *, start_step: int = 0, process_index: Optional[int] = None,
                         process_count: Optional[int] = None,
                         num_shards: Optional[int] = None) -> Iterator[dict]:
  """Infinite {'image': f32 [B, R, R, 3], 'label': i32 [B]} batches, B = batch / processes.

  The split is cut into `num_shards` shards (default: one per process; training passes one per
  device), each shuffled and augmented on its own; a process reads its consecutive share of them
  and puts batch / num_shards rows of each into every batch."""
  index, count = _process_index_and_count(process_index, process_count)
  num_shards = num_shards or count
  local_batch = _local_batch_size(config.batch, 'config.batch', count)
  shard_batch = _local_batch_size(config.batch, 'config.batch', num_shards, 'data shards')
  if num_shards % count:
    raise ValueError(f'{num_shards} data shards do not divide among {count} processes.')
  per_process = num_shards // count
  source = _get_source(config)
  cache = _use_cache(config, source.image_shape,
                     source.shard(config.train_split, index, count).num_examples)
  # config.shuffle_buffer is the total over all shards, so that the stream does not depend on how
  # many shards a process reads (a process holds shuffle_buffer / processes examples).
  shuffle_buffer = max(1, math.ceil(config.shuffle_buffer / num_shards))
  streams = [_shard_stream(config, source, shard, num_shards, start_step * shard_batch,
                           shuffle_buffer, cache)
             for shard in range(index * per_process, (index + 1) * per_process)]
  choice = tf.data.Dataset.range(per_process * shard_batch).map(
      lambda row: row // shard_batch).repeat()
  ds = streams[0] if per_process == 1 else tf.data.Dataset.choose_from_datasets(streams, choice)
  return _numpy_batches(ds, local_batch)


def _shard_stream(config, source, index: int, count: int, first_example: int,
                  shuffle_buffer: int, cache: bool) -> tf.data.Dataset:
  """Shard `index` of `count` of the train split: endless shuffled, augmented examples."""
  shard = source.shard(config.train_split, index, count)
  if not shard.num_examples:
    raise ValueError(f'Data shard {index} of {count} has no examples of {config.dataset} '
                     f'{config.train_split}.')
  records = shard.records
  decode = lambda record: preprocessing.decode(source.read(record))
  if cache:
    records = records.map(lambda image, label: (decode(image), label),
                          num_parallel_calls=tf.data.AUTOTUNE).cache()
    decode = tf.identity
  seed = tf.constant([config.seed, index], tf.int64)
  preprocess = preprocessing.train_preprocess(config.pp)
  ds = _shuffled_epochs(records, shard.num_examples, shuffle_buffer, seed, first_example)

  def example(i, record):  # i: position in this shard's stream, so resuming is exact.
    image, label = record
    image = preprocess(decode(image), tf.random.experimental.stateless_fold_in(seed, i))
    return {'image': image, 'label': tf.cast(label, tf.int32)}

  return ds.enumerate(first_example).map(example, num_parallel_calls=tf.data.AUTOTUNE)


def build_eval_iterator(config, *, split: Optional[str] = None,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> Iterator[dict]:
  """One pass over `split` (default config.eval_split) of {'image', 'label', 'mask'} batches of
  batch_eval / processes. Every process yields the same number of batches; across processes each
  example appears once with mask=True, the padding with mask=False."""
  index, count = _process_index_and_count(process_index, process_count)
  local_batch = _local_batch_size(config.batch_eval, 'config.batch_eval', count)
  source = _get_source(config)
  split = split or config.eval_split
  shard = source.shard(split, index, count)
  # Shards differ by at most one example, the first ones being larger (tfds.even_splits).
  largest_shard = math.ceil(source.shard(split, 0, 1).num_examples / count)
  num_batches = math.ceil(largest_shard / local_batch)
  ds = shard.records.map(
      lambda image, label: {'image': preprocessing.eval_image(source.read(image), config.pp),
                            'label': tf.cast(label, tf.int32), 'mask': True},
      num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(ds.element_spec['image'].shape), 'label': 0, 'mask': False})
  ds = ds.concatenate(padding.repeat(num_batches * local_batch - shard.num_examples))
  return _numpy_batches(ds, local_batch)


def prefetch_to_mesh(iterator: Iterator[dict], sharding: jax.sharding.NamedSharding,
                     size: int = 2) -> Iterator[dict]:
  """Host-local numpy batches -> global jax.Arrays (batch axis across processes), `size` ahead."""
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), batch))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def _process_index_and_count(index: Optional[int], count: Optional[int]) -> tuple[int, int]:
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, process_count={count}).')
  return index, count


def _local_batch_size(batch: int, field: str, parts: int, what: str = 'processes') -> int:
  if batch % parts:
    raise ValueError(f'{field}={batch} is not divisible by the {parts} {what}.')
  return batch // parts


def _use_cache(config, image_shape, num_examples: int) -> bool:
  if config.cache is not None:
    return config.cache
  return None not in image_shape and num_examples * np.prod(image_shape) <= _AUTO_CACHE_BYTES


def _shuffled_epochs(records: tf.data.Dataset, num_examples: int, shuffle_buffer: int,
                     seed: tf.Tensor, first_example: int) -> tf.data.Dataset:
  """Endless epochs, each shuffled with its own seed, starting `first_example` into the stream
  (whole epochs before it are never read; the rest is skipped on undecoded records)."""
  first_epoch, offset = divmod(first_example, num_examples)

  def epoch(e):
    epoch_seed = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(seed, e), minval=None, maxval=None,
        dtype=tf.int64)
    return records.shuffle(min(shuffle_buffer, num_examples), seed=epoch_seed)

  return tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)


def _numpy_batches(ds: tf.data.Dataset, batch_size: int) -> Iterator[dict]:
  options = tf.data.Options()
  options.deterministic = True
  # Without the autotuning thread, which deleting an iterator waits for, up to a minute; the
  # pipeline is no slower without it (README, the demo's "Speed first").
  options.autotune.enabled = False
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(options).as_numpy_iterator()

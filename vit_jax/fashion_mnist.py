"""Fashion-MNIST as a TFDS dataset built offline from the Debian IDX files.

`tfds.builder('fashion_mnist')` downloads its source files, which is impossible here; the Debian
package `dataset-fashion-mnist` ships the same four IDX files under `DEBIAN_DIR`.
`FashionMnistLocal` (registered as `fashion_mnist_local`) makes them a prepared TFDS dataset with
TFDS' features and splits; `prepared_builder(data_dir)` prepares it on first use.
"""
import fcntl
import gzip
import io
import os
from typing import Iterator, Optional

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'

CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')

# split -> (images file, labels file), as named in the Debian package and the original release.
SPLIT_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}

_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one the format files use.


def read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (optionally gzipped) with `ndim` dimensions: 2 zero
  bytes, type code 0x08, `ndim`, one big-endian int32 per dimension, then exactly that many data
  bytes. ValueError naming `path` when any of this does not hold."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:  # gzip raises these on corrupt or truncated archives.
    raise ValueError(f'Cannot read IDX file {path}: {e}') from e
  header_size = 4 + 4 * ndim
  expected_magic = bytes([0, 0, _IDX_UBYTE, ndim])
  if data[:4] != expected_magic:
    raise ValueError(f'{path} is not a {ndim}-d uint8 IDX file: magic number '
                     f'0x{data[:4].hex()}, expected 0x{expected_magic.hex()}.')
  if len(data) < header_size:
    raise ValueError(f'{path} is truncated: {len(data)} bytes, header alone needs {header_size}.')
  shape = tuple(int(d) for d in np.frombuffer(data, '>i4', count=ndim, offset=4))
  size = int(np.prod(shape))
  if len(data) - header_size != size:
    raise ValueError(f'{path} holds {len(data) - header_size} data bytes, but its header '
                     f'declares shape {shape} = {size} bytes.')
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def read_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28], labels uint8 [N]) of `split` ('train' or 'test')."""
  images_path, labels_path = (os.path.join(source_dir, name) for name in SPLIT_FILES[split])
  images = read_idx(images_path, ndim=3)
  labels = read_idx(labels_path, ndim=1)
  if images.shape[1:] != (28, 28):
    raise ValueError(f'{images_path}: images are {images.shape[1:]}, expected (28, 28).')
  if len(images) != len(labels):
    raise ValueError(f'{images_path} has {len(images)} images but {labels_path} has '
                     f'{len(labels)} labels.')
  if labels.max(initial=0) >= len(CLASS_NAMES):
    raise ValueError(f'{labels_path} has label {labels.max()}, expected < {len(CLASS_NAMES)}.')
  return images, labels


def is_available(source_dir: str = DEBIAN_DIR) -> bool:
  """Whether all four IDX files are present in `source_dir`."""
  return all(os.path.isfile(os.path.join(source_dir, name))
             for names in SPLIT_FILES.values() for name in names)


def _encode_png(image: np.ndarray) -> bytes:
  # PIL is ~30x faster than tfds' own ndarray encoding (a TF graph call per image).
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST read from local IDX files (the download config's manual_dir)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Built from the Debian dataset-fashion-mnist IDX files.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Place the four Fashion-MNIST IDX files ({", ".join(sum(SPLIT_FILES.values(), ()))}) in '
      f'the manual dir; `apt-get install dataset-fashion-mnist` puts them in {DEBIAN_DIR}.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Fashion-MNIST: 28x28 grayscale images of Zalando articles, 10 classes.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(source_dir, split) for split in SPLIT_FILES}

  def _generate_examples(self, source_dir: str, split: str) -> Iterator[tuple[int, dict]]:
    images, labels = read_split(source_dir, split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': _encode_png(image), 'label': int(label)}


def prepared_builder(data_dir: Optional[str] = None,
                     source_dir: str = DEBIAN_DIR) -> FashionMnistLocal:
  """The builder in `data_dir` (TFDS' default when None), prepared on first use under a file lock,
  so that processes sharing `data_dir` prepare it once."""
  builder = FashionMnistLocal(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  dataset_dir = os.path.dirname(os.fspath(builder.data_dir))
  os.makedirs(dataset_dir, exist_ok=True)
  with open(os.path.join(dataset_dir, 'prepare.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = FashionMnistLocal(data_dir=data_dir)  # Another process may have prepared it.
    if not builder.is_prepared():
      logging.info('Preparing %s from %s into %s', builder.name, source_dir, builder.data_dir)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=source_dir))
  return builder

"""Tests of vit_jax.fashion_mnist: the IDX reader and the offline TFDS builder."""
import gzip

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_jax import fashion_mnist

needs_debian_files = pytest.mark.skipif(
    not fashion_mnist.is_available(),
    reason=f'Fashion-MNIST IDX files not in {fashion_mnist.DEBIAN_DIR} '
           '(apt-get install dataset-fashion-mnist)')


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, '>i4').tobytes()
  return header + array.astype(np.uint8).tobytes()


def _write(path, data: bytes) -> str:
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(data)
  return str(path)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  # Same directory as tests/test_input_pipeline.py uses, so one session prepares it once.
  return str(tmp_path_factory.getbasetemp() / 'tfds')


@pytest.fixture(scope='session')
def builder(data_dir):
  return fashion_mnist.prepared_builder(data_dir)


@pytest.mark.parametrize('name', ['images.idx', 'images.idx.gz'])
def test_read_idx_round_trip(tmp_path, name):
  array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  path = _write(tmp_path / name, _idx_bytes(array))
  np.testing.assert_array_equal(fashion_mnist.read_idx(path, ndim=3), array)


@pytest.mark.parametrize('data, message', [
    (_idx_bytes(np.zeros((2, 3, 4))), 'magic number 0x00000803, expected 0x00000801'),
    (bytes([0, 0, 0x0D, 1]) + np.array([2], '>i4').tobytes() + bytes(8), 'magic number'),
    (bytes([0, 0, 0x08, 1, 0]), 'truncated'),
    (_idx_bytes(np.zeros(5))[:-1], 'holds 4 data bytes'),
    (_idx_bytes(np.zeros(5)) + b'x', 'holds 6 data bytes'),
])
def test_read_idx_rejects_malformed_files(tmp_path, data, message):
  path = _write(tmp_path / 'labels.idx.gz', data)
  with pytest.raises(ValueError, match=message) as error:
    fashion_mnist.read_idx(path, ndim=1)
  assert path in str(error.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path):
  path = tmp_path / 'labels.idx.gz'
  path.write_bytes(gzip.compress(_idx_bytes(np.zeros(100)))[:30])
  with pytest.raises(ValueError, match='Cannot read IDX file .*labels.idx.gz'):
    fashion_mnist.read_idx(str(path), ndim=1)


def _write_split(directory, split: str, images: np.ndarray, labels: np.ndarray):
  images_name, labels_name = fashion_mnist.SPLIT_FILES[split]
  _write(directory / images_name, _idx_bytes(images))
  _write(directory / labels_name, _idx_bytes(labels))


@pytest.mark.parametrize('images, labels, message', [
    (np.zeros((3, 28, 28)), np.zeros(2), 'has 3 images but .* has 2 labels'),
    (np.zeros((3, 28, 27)), np.zeros(3), r'images are \(28, 27\)'),
    (np.zeros((3, 28, 28)), np.array([0, 10, 1]), 'has label 10'),
])
def test_read_split_checks_consistency(tmp_path, images, labels, message):
  _write_split(tmp_path, 'test', images, labels)
  with pytest.raises(ValueError, match=message):
    fashion_mnist.read_split(str(tmp_path), 'test')


def test_is_available(tmp_path):
  _write_split(tmp_path, 'test', np.zeros((1, 28, 28)), np.zeros(1))
  assert not fashion_mnist.is_available(str(tmp_path))  # The train files are missing.
  _write_split(tmp_path, 'train', np.zeros((1, 28, 28)), np.zeros(1))
  assert fashion_mnist.is_available(str(tmp_path))


@needs_debian_files
@pytest.mark.parametrize('split, size', [('train', 60_000), ('test', 10_000)])
def test_read_split_of_the_debian_files(split, size):
  images, labels = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, split)
  assert images.shape == (size, 28, 28) and labels.shape == (size,)
  np.testing.assert_array_equal(np.bincount(labels), [size // 10] * 10)  # Balanced classes.


def test_builder_name_does_not_clash_with_tfds():
  assert fashion_mnist.FashionMnistLocal.name == 'fashion_mnist_local'
  assert tfds.builder_cls('fashion_mnist_local') is fashion_mnist.FashionMnistLocal
  assert tfds.builder_cls('fashion_mnist') is not fashion_mnist.FashionMnistLocal


@needs_debian_files
def test_prepared_builder_info(builder):
  assert builder.is_prepared()
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
      'train': 60_000, 'test': 10_000}
  features = builder.info.features
  assert features['image'].shape == (28, 28, 1)
  assert features['label'].names == list(fashion_mnist.CLASS_NAMES)


@needs_debian_files
def test_prepared_test_split_matches_the_idx_files(builder):
  images, labels = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, 'test')
  ds = builder.as_dataset(split='test', shuffle_files=False, batch_size=10_000)
  batch = next(iter(tfds.as_numpy(ds)))
  # TFDS may reorder examples when writing; compare as multisets.
  expected = sorted(zip(labels.tolist(), (image.tobytes() for image in images)))
  got = sorted(zip(batch['label'].tolist(), (image.tobytes() for image in batch['image'][..., 0])))
  assert got == expected


@needs_debian_files
def test_prepared_builder_is_reused(builder, data_dir, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('prepared again')
  monkeypatch.setattr(fashion_mnist.FashionMnistLocal, 'download_and_prepare', fail)
  assert fashion_mnist.prepared_builder(data_dir).data_dir == builder.data_dir

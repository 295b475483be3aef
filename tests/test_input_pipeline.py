"""Tests of vit_jax.input_pipeline on image folders, mocked TFDS datasets and real Fashion-MNIST."""
import collections
import itertools
import logging

import jax
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vit_jax import benchmark_lib
from vit_jax import fashion_mnist
from vit_jax import input_pipeline

needs_debian_files = pytest.mark.skipif(
    not fashion_mnist.is_available(),
    reason=f'Fashion-MNIST IDX files not in {fashion_mnist.DEBIAN_DIR}')


def make_config(dataset, *, resolution=8, batch=8, **overrides):
  config = ml_collections.ConfigDict({
      'dataset': dataset, 'data_dir': None, 'train_split': 'train', 'eval_split': 'test',
      'pp': {'train': 'resize_crop', 'eval': 'resize', 'resolution': resolution},
      'batch': batch, 'batch_eval': batch, 'shuffle_buffer': 1000, 'seed': 0, 'cache': None,
      'folder_test_fraction': 0.1, 'tfds_manual_dir': None,
  })
  config.update(overrides)
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


# ---------------------------------------------------------------------------------------------
# Image folders whose images are solid colours: red = a unique id, so examples stay identifiable
# through resizing, cropping and flipping.


def write_image(path, red, mode='RGB', size=(12, 10)):
  color = red if mode == 'L' else (red, 7, 200)
  Image.new(mode, size, color).save(path)


def make_folder(root, layout, first_id=0):
  """layout: {class name: number of PNGs}; returns {id: label} (labels by sorted class name)."""
  ids = {}
  next_id = first_id
  for label, (class_name, count) in enumerate(sorted(layout.items())):
    (root / class_name).mkdir(parents=True)
    for _ in range(count):
      write_image(root / class_name / f'{next_id:03d}.png', next_id)
      ids[next_id] = label
      next_id += 1
  return ids


def image_ids(images):
  """Recovers the ids (red channel) of a batch of solid-colour images."""
  red = np.round((images[..., 0] + 1) * 127.5)
  assert (red == red[:, :1, :1]).all()
  return red[:, 0, 0].astype(int).tolist()


@pytest.fixture
def split_folder(tmp_path):
  """train/ (40 images, 3 classes) and test/ (13 images); returns (root, train ids, test ids)."""
  train = make_folder(tmp_path / 'train', {'cat': 15, 'dog': 15, 'bird': 10})
  test = make_folder(tmp_path / 'test', {'cat': 5, 'dog': 4, 'bird': 4}, first_id=100)
  return tmp_path, train, test


def test_folder_with_split_folders(split_folder):
  root, train, test = split_folder
  info = input_pipeline.get_dataset_info(make_config(f'folder:{root}'))
  assert info == input_pipeline.DatasetInfo(num_classes=3, num_train_examples=40,
                                            num_eval_examples=13)
  batch = next(input_pipeline.build_train_iterator(make_config(f'folder:{root}'), process_count=1,
                                                   process_index=0))
  assert batch['image'].shape == (8, 8, 8, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert batch['label'].tolist() == [train[i] for i in image_ids(batch['image'])]


@pytest.mark.parametrize('eval_dir', ['val', 'validation'])
def test_folder_eval_folder_aliases(tmp_path, eval_dir):
  make_folder(tmp_path / 'train', {'a': 2, 'b': 2})
  make_folder(tmp_path / eval_dir, {'b': 3})
  for eval_split in ('test', eval_dir):  # 'test' stands for whichever eval folder exists.
    config = make_config(f'folder:{tmp_path}', eval_split=eval_split)
    info = input_pipeline.get_dataset_info(config)
    assert (info.num_classes, info.num_eval_examples) == (2, 3)
    batch = next(input_pipeline.build_eval_iterator(config, process_index=0, process_count=1))
    assert batch['label'][batch['mask']].tolist() == [1, 1, 1]


def test_folder_uses_the_named_eval_folder(tmp_path):
  make_folder(tmp_path / 'train', {'a': 2})
  make_folder(tmp_path / 'test', {'a': 3})
  make_folder(tmp_path / 'val', {'a': 4})
  config = make_config(f'folder:{tmp_path}', eval_split='val')
  assert input_pipeline.get_dataset_info(config).num_eval_examples == 4
  config.eval_split = 'holdout'
  with pytest.raises(ValueError, match="'holdout' of folder:.*'test', 'train', 'val'"):
    input_pipeline.get_dataset_info(config)


def test_folder_fraction_split(tmp_path):
  ids = make_folder(tmp_path, {'a': 10, 'b': 20, 'c': 5})
  config = make_config(f'folder:{tmp_path}', folder_test_fraction=0.2)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (28, 7)  # ceil(0.2 n) per class.
  seen = [eval_ids(config, split) for split in ('train', 'test')]
  assert sorted(seen[0] + seen[1]) == sorted(ids)
  assert collections.Counter(ids[i] for i in seen[1]) == {0: 2, 1: 4, 2: 1}
  input_pipeline._list_folder.cache_clear()
  assert eval_ids(config, 'test') == seen[1]  # Deterministic.


def eval_ids(config, split, process_index=0, process_count=1):
  """Ids of the masked examples of one eval pass over `split`."""
  config = config.copy_and_resolve_references()
  config.eval_split = split
  ids = []
  for batch in input_pipeline.build_eval_iterator(config, process_index=process_index,
                                                  process_count=process_count):
    ids += [i for i, keep in zip(image_ids(batch['image']), batch['mask']) if keep]
  return ids


def test_folder_skips_undecodable_files_with_one_warning(split_folder, caplog):
  root, train, _ = split_folder
  (root / 'train' / 'cat' / 'truncated.png').write_bytes(
      (root / 'train' / 'bird' / '000.png').read_bytes()[:40])
  (root / 'train' / 'dog' / 'garbage.jpg').write_bytes(b'not an image at all')
  (root / 'train' / 'dog' / 'notes.txt').write_text('ignored: not an image extension')
  write_image(root / 'train' / 'dog' / 'gray.png', 250, mode='L')
  config = make_config(f'folder:{root}', batch=41)
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(config)
  assert info.num_train_examples == 41
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert 'Skipping 2 undecodable' in warnings[0]
  assert 'cat/truncated.png' in warnings[0] and 'dog/garbage.jpg' in warnings[0]
  batches = take(input_pipeline.build_train_iterator(config, process_index=0, process_count=1), 3)
  assert all(sorted(image_ids(b['image'])) == sorted([*train, 250]) for b in batches)


def test_folder_empty_class_folder_raises(split_folder):
  root, _, _ = split_folder
  (root / 'train' / 'empty').mkdir()
  with pytest.raises(ValueError, match=f'Class folder {root}/train/empty has no'):
    input_pipeline.get_dataset_info(make_config(f'folder:{root}'))


def make_undecodable_folder(root):
  (root / 'cat').mkdir(parents=True)
  (root / 'cat' / 'x.png').write_text('not a PNG')


@pytest.mark.parametrize('make_test_split, message', [
    (lambda test: test.mkdir(), 'test has no class sub-folders'),
    (lambda test: make_folder(test, {'unknown': 1}), 'test/unknown is not one of the training'),
    (make_undecodable_folder, "Split 'test' of image folder .* has no decodable images"),
])
def test_folder_bad_eval_split_raises(tmp_path, make_test_split, message):
  make_folder(tmp_path / 'train', {'cat': 2})
  make_test_split(tmp_path / 'test')
  with pytest.raises(ValueError, match=message):
    input_pipeline.get_dataset_info(make_config(f'folder:{tmp_path}'))


def test_folder_errors_name_the_folder(tmp_path):
  with pytest.raises(ValueError, match=f'{tmp_path}/missing does not exist'):
    input_pipeline.get_dataset_info(make_config(f'folder:{tmp_path}/missing'))
  make_folder(tmp_path / 'train', {'cat': 2})
  with pytest.raises(ValueError, match=f'{tmp_path} has a train/ folder but none of'):
    input_pipeline.get_dataset_info(make_config(f'folder:{tmp_path}'))


# ---------------------------------------------------------------------------------------------
# Training stream: sharding, epochs, determinism, resumption.


def test_train_shards_are_disjoint_and_reshuffled_every_epoch(split_folder):
  root, train, _ = split_folder
  config = make_config(f'folder:{root}', batch=8)  # 2 processes x 4; 20 examples = 5 batches.
  epochs = []
  for index in range(2):
    batches = take(input_pipeline.build_train_iterator(config, process_index=index,
                                                       process_count=2), 15)
    assert all(b['image'].shape == (4, 8, 8, 3) for b in batches)
    ids = sum((image_ids(b['image']) for b in batches), [])
    assert sum((b['label'].tolist() for b in batches), []) == [train[i] for i in ids]
    epochs.append([ids[k:k + 20] for k in range(0, 60, 20)])
  for shard in epochs:
    assert all(sorted(epoch) == sorted(shard[0]) for epoch in shard)  # Whole shard every epoch.
    assert len({tuple(epoch) for epoch in shard}) == 3  # In a new order every epoch.
  assert sorted(epochs[0][0] + epochs[1][0]) == sorted(train)  # Disjoint, covering.


def test_device_shards_give_the_same_global_batches_however_many_processes(split_folder):
  root, train, _ = split_folder
  config = make_config(f'folder:{root}', batch=8)  # 4 shards of 10 examples, 2 rows each.
  build = lambda index, count: take(input_pipeline.build_train_iterator(
      config, process_index=index, process_count=count, num_shards=4), 6)
  one = build(0, 1)
  two = [build(index, 2) for index in range(2)]
  for step, batch in enumerate(one):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([two[0][step][key], two[1][step][key]]))
  # Rows 2s, 2s+1 of every batch come from shard s: its first 10 rows are one epoch of it.
  ids = np.array([image_ids(b['image']) for b in one]).reshape(6, 4, 2)
  first_epochs = ids.transpose(1, 0, 2).reshape(4, 12)[:, :10]
  assert sorted(first_epochs.ravel().tolist()) == sorted(train)


@pytest.mark.parametrize('pp_train, cache', [('resize_crop', None), ('resize_crop', False),
                                             ('inception', True)])
def test_train_is_deterministic_and_resumable(split_folder, pp_train, cache):
  root, _, _ = split_folder
  config = make_config(f'folder:{root}', resolution=6, batch=6, cache=cache)
  config.pp.train = pp_train
  build = lambda **kw: input_pipeline.build_train_iterator(config, process_count=1,
                                                           process_index=0, **kw)
  reference = take(build(), 16)  # 96 examples: 2.4 epochs.
  for start_step in (6, 13):  # Into the first and the second epoch.
    resumed = take(build(start_step=start_step), 16 - start_step)
    for expected, got in zip(reference[start_step:], resumed, strict=True):
      np.testing.assert_array_equal(got['image'], expected['image'])
      np.testing.assert_array_equal(got['label'], expected['label'])
  config.seed = 1
  assert not np.array_equal(take(build(), 1)[0]['image'], reference[0]['image'])


def test_train_resumes_far_into_the_stream_cheaply(split_folder):
  root, _, _ = split_folder
  config = make_config(f'folder:{root}', batch=8)
  build = lambda step: input_pipeline.build_train_iterator(config, start_step=step,
                                                           process_index=1, process_count=2)
  step = 10**9  # Replaying the stream would take days.
  np.testing.assert_array_equal(take(build(step - 1), 2)[1]['image'],
                                take(build(step), 1)[0]['image'])


def test_inception_crop_varies_the_crop(tmp_path):
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  (tmp_path / 'test' / 'a').mkdir(parents=True)
  gradient = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (50, 1))
  Image.fromarray(gradient).save(tmp_path / 'train' / 'a' / 'x.png')
  Image.fromarray(gradient).save(tmp_path / 'test' / 'a' / 'x.png')
  config = make_config(f'folder:{tmp_path}', resolution=16, batch=16)
  config.pp.train = 'inception'
  batch = next(input_pipeline.build_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (16, 16, 16, 3)
  assert len({round(float(image.std()), 3) for image in batch['image']}) > 8  # Different zooms.
  # area_min=1: the crop is the whole image, so every example is it resized, or its mirror.
  config.pp.area_min = 1.0
  batch = next(input_pipeline.build_train_iterator(config, process_index=0, process_count=1))
  whole = next(input_pipeline.build_eval_iterator(config, process_index=0,
                                                  process_count=1))['image'][0]
  for image in batch['image']:
    assert (np.allclose(image, whole, atol=1e-5) or np.allclose(image, whole[:, ::-1], atol=1e-5))


@pytest.mark.parametrize('pp_eval', ['resize', 'central_crop'])
def test_eval_preprocess_is_deterministic(split_folder, pp_eval):
  root, _, _ = split_folder
  config = make_config(f'folder:{root}', resolution=8)
  config.pp.eval = pp_eval
  passes = [take(input_pipeline.build_eval_iterator(config, process_index=0, process_count=1), 2)
            for _ in range(2)]
  np.testing.assert_array_equal(passes[0][1]['image'], passes[1][1]['image'])
  assert passes[0][0]['image'].shape == (8, 8, 8, 3)


@pytest.mark.parametrize('process_count, batch_eval', [(1, 4), (2, 4), (3, 6), (2, 40)])
def test_eval_masks_every_example_exactly_once(split_folder, process_count, batch_eval):
  root, _, test = split_folder
  config = make_config(f'folder:{root}', batch_eval=batch_eval)
  passes = [list(input_pipeline.build_eval_iterator(config, process_index=index,
                                                    process_count=process_count))
            for index in range(process_count)]
  assert len({len(batches) for batches in passes}) == 1  # Same number of steps everywhere.
  local_batch = batch_eval // process_count
  masked = []
  for batches in passes:
    for batch in batches:
      assert batch['image'].shape[0] == batch['mask'].shape[0] == local_batch
      assert batch['mask'].dtype == bool
      masked += [i for i, keep in zip(image_ids(batch['image']), batch['mask']) if keep]
      assert (batch['label'][~batch['mask']] == 0).all()
  assert sorted(masked) == sorted(test)


@pytest.mark.parametrize('field, build', [
    ('config.batch', input_pipeline.build_train_iterator),
    ('config.batch_eval', input_pipeline.build_eval_iterator),
])
def test_batch_must_divide_among_processes(split_folder, field, build):
  root, _, _ = split_folder
  with pytest.raises(ValueError, match=f'{field}=9 is not divisible by the 2 processes'):
    build(make_config(f'folder:{root}', batch=9, batch_eval=9), process_index=0, process_count=2)


# ---------------------------------------------------------------------------------------------
# TFDS datasets (mocked: random examples, `num_examples` of them in every split).


@pytest.mark.parametrize('name, num_classes', [
    ('cifar10', 10), ('cifar100', 100), ('imagenet2012', 1000), ('imagenet_v2', 1000),
    ('oxford_iiit_pet', 37), ('oxford_flowers102', 102)])
def test_tfds_datasets(name, num_classes):
  config = make_config(name, resolution=16, batch=4, batch_eval=6)
  config.train_split, config.eval_split = 'train[:99%]', 'train[99%:]'  # Minival style.
  with tfds.testing.mock_data(num_examples=5):
    assert input_pipeline.get_dataset_info(config) == input_pipeline.DatasetInfo(
        num_classes, 5, 5)
    train = take(input_pipeline.build_train_iterator(config, process_index=0, process_count=1),
                 3)
    evals = list(input_pipeline.build_eval_iterator(config, process_index=0, process_count=1))
  for batch in train + evals:
    assert batch['image'].shape[1:] == (16, 16, 3)
    assert -1 <= batch['image'].min() <= batch['image'].max() <= 1
    assert ((0 <= batch['label']) & (batch['label'] < num_classes)).all()
  assert [b['mask'].sum() for b in evals] == [5]


@pytest.mark.parametrize('name, message', [
    ('no_such_dataset_xyz', "Unknown dataset 'no_such_dataset_xyz'"),
    ('imdb_reviews', "Dataset 'imdb_reviews' needs an `image`"),
])
def test_unusable_tfds_names_raise(name, message):
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ValueError, match=message):
      input_pipeline.get_dataset_info(make_config(name))


# ---------------------------------------------------------------------------------------------
# Real Fashion-MNIST (prepared once per session from the Debian IDX files).


@pytest.fixture
def fashion_config(tmp_path_factory):
  # Same data_dir as tests/test_fashion_mnist.py: a session prepares the dataset only once.
  return make_config('fashion_mnist', data_dir=str(tmp_path_factory.getbasetemp() / 'tfds'))


@needs_debian_files
def test_fashion_mnist_info(fashion_config):
  assert input_pipeline.get_dataset_info(fashion_config) == input_pipeline.DatasetInfo(
      10, 60_000, 10_000)
  fashion_config.train_split, fashion_config.eval_split = 'train[:99%]', 'train[99%:]'
  assert input_pipeline.get_dataset_info(fashion_config) == input_pipeline.DatasetInfo(
      10, 59_400, 600)


@needs_debian_files
@pytest.mark.parametrize('resolution, pp_train', [(32, 'resize_crop'), (48, 'inception')])
def test_fashion_mnist_batches(fashion_config, resolution, pp_train):
  config = fashion_config
  config.pp.resolution, config.pp.train = resolution, pp_train
  config.batch = config.batch_eval = 64
  for build in (input_pipeline.build_train_iterator, input_pipeline.build_eval_iterator):
    batch = next(build(config, process_index=1, process_count=2))
    assert batch['image'].shape == (32, resolution, resolution, 3)
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1
    assert 0 <= batch['label'].min() and batch['label'].max() <= 9
    np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])  # Gray -> RGB.


def fingerprints(images):
  """Flip-invariant identity of float images at 28px (exact inverse of the normalisation)."""
  pixels = np.round((images[..., 0] + 1) * 127.5).astype(np.uint8)
  return [min(p.tobytes(), p[:, ::-1].tobytes()) for p in pixels]


def idx_fingerprints(split):
  images, labels = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, split)
  return collections.Counter(zip(labels.tolist(), fingerprints(images[..., None] / 127.5 - 1)))


@needs_debian_files
def test_fashion_mnist_train_shards_cover_the_split(fashion_config):
  config = fashion_config
  config.train_split = 'test'  # The smaller split keeps the test fast; the code is the same.
  # Resize 28 -> 28 and crop 28 of 28 are exact, so an epoch can be compared with the files.
  config.pp.resolution, config.pp.resize, config.batch = 28, 28, 1000
  seen = collections.Counter()
  for index in range(2):
    iterator = input_pipeline.build_train_iterator(config, process_index=index, process_count=2)
    for batch in take(iterator, 10):  # 10 x 500 = one epoch of the 5,000-example shard.
      seen.update(zip(batch['label'].tolist(), fingerprints(batch['image'])))
  assert seen == idx_fingerprints('test')


@needs_debian_files
def test_fashion_mnist_eval_covers_the_test_split_once(fashion_config):
  config = fashion_config
  config.pp.resolution, config.batch_eval = 28, 3000  # 2 x 1500: 4 batches, 1000 pads each.
  seen = collections.Counter()
  for index in range(2):
    batches = list(input_pipeline.build_eval_iterator(config, process_index=index,
                                                      process_count=2))
    assert len(batches) == 4 and sum(b['mask'].sum() for b in batches) == 5000
    for b in batches:
      seen.update(zip(b['label'][b['mask']].tolist(), fingerprints(b['image'][b['mask']])))
  assert seen == idx_fingerprints('test')


# ---------------------------------------------------------------------------------------------
# Device transfer and the benchmark.


def test_prefetch_to_mesh_keeps_size_batches_in_flight():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  batch_size = 2 * len(jax.devices())
  host_batches = [{'image': np.full((batch_size, 4, 4, 3), i, np.float32),
                   'label': np.arange(batch_size, dtype=np.int32) + i} for i in range(5)]
  consumed = []

  def source():
    for batch in host_batches:
      consumed.append(batch)
      yield batch

  iterator = input_pipeline.prefetch_to_mesh(source(), sharding, size=2)
  first = next(iterator)
  assert len(consumed) == 2
  rest = list(iterator)
  for host, device in zip(host_batches, [first] + rest, strict=True):
    for key in ('image', 'label'):
      assert isinstance(device[key], jax.Array) and device[key].sharding == sharding
      np.testing.assert_array_equal(np.asarray(device[key]), host[key])


def test_bench(split_folder):
  root, _, _ = split_folder
  assert benchmark_lib.pipeline_images_per_s(make_config(f'folder:{root}'), steps=3) > 0

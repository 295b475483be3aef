"""vit_jax.preprocessing: the official crops and scaling, one path for evaluation and inference."""
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests.test_analysis import parse_flags
from tests.test_analysis import write_workdir
from vit_jax import checkpoint
from vit_jax import inference
from vit_jax import input_pipeline
from vit_jax import predict
from vit_jax import preprocessing


def _pp(**fields):
  return ml_collections.ConfigDict({'train': 'inception', 'eval': 'resize', 'resolution': 8,
                                    'resize': None, 'area_min': 0.05, **fields})


def _ramp(height, width):
  """uint8 [h, w, 3] image whose value is the column index (4x: exactly representable)."""
  return np.broadcast_to((4 * np.arange(width))[None, :, None], (height, width, 3)).astype(
      np.uint8)


@pytest.mark.parametrize('transpose', [False, True])
def test_central_crop_keeps_the_aspect_ratio_of_non_square_images(transpose):
  # A 4x8 image (2:1): its short side goes 4 -> 8, so it becomes 8x16, and the crop keeps
  # columns 4..11. Bilinear upsampling by 2 (half-pixel centres) samples column j of the
  # 8-wide ramp at j / 2 - 0.25, so the crop holds 4 * (j / 2 - 0.25) for j = 4..11.
  image = _ramp(4, 8)
  want = np.broadcast_to(4 * (np.arange(4, 12) / 2 - 0.25), (8, 8))
  if transpose:
    image, want = image.transpose(1, 0, 2), want.T
  out = preprocessing.eval_preprocess(_pp(eval='central_crop', resize=8))(tf.constant(image))
  np.testing.assert_allclose(out.numpy()[..., 0], (want - 127.5) / 127.5, atol=1e-6)


def test_central_crop_of_a_square_image_is_its_centre_after_the_resize():
  image = np.random.default_rng(0).integers(0, 256, (12, 12, 3), np.uint8)
  out = preprocessing.eval_preprocess(_pp(eval='central_crop', resize=12))(tf.constant(image))
  np.testing.assert_allclose(out.numpy(), (image[2:10, 2:10] - 127.5) / 127.5, atol=1e-6)


def test_eval_resize_and_scaling_are_the_official_ones():
  image = _ramp(8, 8)
  out = preprocessing.eval_preprocess(_pp())(tf.constant(image)).numpy()
  np.testing.assert_array_equal(out, (image.astype(np.float32) - 127.5) / 127.5)


def test_inception_crop_keeps_at_least_area_min_and_any_aspect_ratio():
  # On a ramp, a crop's first and last columns give its width in the source image.
  image = tf.constant(_ramp(64, 64))
  crop = preprocessing.train_preprocess(_pp(area_min=0.3, resolution=16))
  widths = []
  for seed in range(20):
    out = crop(image, tf.constant([seed, 0], tf.int64)).numpy()
    columns = np.sort(((out[0, [0, -1], 0] * 127.5 + 127.5) / 4))
    widths.append(columns[1] - columns[0])
    assert out.shape == (16, 16, 3) and -1 <= out.min() and out.max() <= 1
  assert len(set(np.round(widths, 1))) > 5  # Crops vary.


def _write_png(path, pixels):
  tf.io.write_file(str(path), tf.io.encode_png(pixels))
  return str(path)


def test_16_bit_png_decodes_as_its_8_bit_version(tmp_path):
  gray8 = np.random.default_rng(0).integers(0, 256, (10, 14, 1), np.uint8)
  path8 = _write_png(tmp_path / 'gray8.png', gray8)
  path16 = _write_png(tmp_path / 'gray16.png', gray8.astype(np.uint16) * 257)
  decoded = preprocessing.decode(tf.io.read_file(path16)).numpy()
  np.testing.assert_array_equal(decoded, np.repeat(gray8, 3, axis=-1))
  _, images = inference.load_images([path8, path16], 8)
  np.testing.assert_array_equal(images[0], images[1])


@pytest.fixture
def eval_workdir(tmp_path):
  """A workdir (random head, central-crop eval) whose folder dataset's test split is one
  non-square PNG, and the 8-bit and 16-bit grayscale PNGs of another image."""
  workdir = write_workdir(tmp_path)
  params = checkpoint.load(os.path.join(workdir, 'model.npz'))
  params['head']['kernel'] = np.random.default_rng(1).normal(
      size=params['head']['kernel'].shape).astype(np.float32)
  checkpoint.save_npz(params, os.path.join(workdir, 'model.npz'))
  rng = np.random.default_rng(2)
  root = tmp_path / 'split'
  for split, count in (('train', 2), ('test', 1)):
    os.makedirs(root / split / 'class0')
    for i in range(count):
      _write_png(root / split / 'class0' / f'{i}.png',
                 rng.integers(0, 256, (24, 40, 3), np.uint8))
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path) as f:
    config = json.load(f)
  config.update(dataset=f'folder:{root}', train_split='train', eval_split='test')
  config['pp'].update(eval='central_crop', resize=20)
  with open(config_path, 'w') as f:
    json.dump(config, f)
  gray8 = rng.integers(0, 256, (30, 18, 1), np.uint8)
  grays = [_write_png(tmp_path / 'gray8.png', gray8),
           _write_png(tmp_path / 'gray16.png', gray8.astype(np.uint16) * 257)]
  return workdir, str(root / 'test' / 'class0' / '0.png'), grays


def test_predict_probabilities_equal_the_eval_pipelines_for_the_same_file(eval_workdir):
  workdir, test_png, _ = eval_workdir
  loaded = inference.load_model(workdir)
  (batch,) = input_pipeline.build_eval_iterator(loaded.run_config, process_index=0,
                                                process_count=1)
  from_pipeline = batch['image'][batch['mask']]
  _, from_predict = inference.load_images([test_png], loaded.resolution, loaded.run_config.pp)
  np.testing.assert_array_equal(from_predict, from_pipeline)
  np.testing.assert_array_equal(inference.probabilities(loaded, from_predict, 4),
                                inference.probabilities(loaded, from_pipeline, 4))


def test_a_16_bit_png_gets_the_prediction_of_its_8_bit_version(eval_workdir):
  workdir, _, (gray8, gray16) = eval_workdir
  outputs = [predict.run(parse_flags(predict.define_flags, [
      f'--checkpoint={workdir}', f'--images={path}', '--top_k=3'])) for path in (gray8, gray16)]
  assert outputs[0].splitlines()[1:] == outputs[1].splitlines()[1:]
  probabilities = [line.split()[0] for line in outputs[0].splitlines()[1:]]
  assert len(set(probabilities)) == 3  # The head is random: the classes differ.

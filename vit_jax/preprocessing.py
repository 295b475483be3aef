"""Image preprocessing, in one place: decoding, train augmentation, eval resizing, scaling.

The input pipeline and every inference path (`vit_jax.inference`) use these functions, so an
image file is classified exactly as the eval pipeline sees it. The `config.pp` choices
(`TRAIN_CROPS`, `EVAL_RESIZES`) are described in docs/ARCHITECTURE.md ("Configuration"); the
official fine-tuning pipeline is the default of configs/vit.py, and `pp.eval='central_crop'` with
`pp.resize = pp.resolution` is the official `PreprocessImages(crop=True)`. Pixels become float32
(x - 127.5) / 127.5, in [-1, 1]; grayscale, RGBA and 16-bit images become 8-bit RGB first.
"""
from typing import Callable

import tensorflow as tf

from vit_jax import config_lib

# TensorFlow only feeds the host (the input pipeline, image decoding): JAX owns the
# accelerators.
tf.config.set_visible_devices([], 'GPU')


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG / PNG / BMP / GIF bytes -> uint8 [H, W, 3]; 16-bit PNGs are scaled to 8 bits
  (a 16-bit image of 257 * v decodes to v), not clipped."""
  return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """Pixel values 0..255 -> float32 (x - 127.5) / 127.5, as the released models were trained."""
  return (tf.cast(image, tf.float32) - 127.5) / 127.5


def _resize_size(pp) -> int:
  return pp.get('resize', None) or round(pp.resolution * 8 / 7)


def _central_crop(image, pp):
  """Short side to `pp.resize` (aspect ratio kept, sides rounded), then the central crop;
  `image` is [H, W, C] or [N, H, W, C]."""
  resolution, resize = pp.resolution, _resize_size(pp)
  height_width = tf.cast(tf.shape(image)[-3:-1], tf.float32)
  scale = resize / tf.reduce_min(height_width)
  size = tf.maximum(tf.cast(tf.round(height_width * scale), tf.int32), resize)
  return tf.image.resize_with_crop_or_pad(tf.image.resize(image, size), resolution, resolution)


def _inception(image, seed, pp):
  """A crop of pp.area_min to all of the area, any aspect ratio, resized to the resolution."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
      area_range=(pp.get('area_min', config_lib.DEFAULT_AREA_MIN), 1.0),
      use_image_if_no_bounding_boxes=True)
  return tf.image.resize(tf.slice(image, begin, size), [pp.resolution, pp.resolution])


def _resize_crop(image, seed, pp):
  """A square resize to `pp.resize`, then a random crop to the resolution."""
  resize = _resize_size(pp)
  image = tf.image.resize(image, [resize, resize])
  return tf.image.stateless_random_crop(image, [pp.resolution, pp.resolution, 3], seed=seed)


# config.pp.train -> (image, seed, pp) -> crop; config.pp.eval -> (image, pp) -> resized. Their
# names are config_lib.PP_TRAIN / PP_EVAL, which validate reads without importing TensorFlow.
TRAIN_CROPS = {'inception': _inception, 'resize_crop': _resize_crop}
EVAL_RESIZES = {
    'resize': lambda image, pp: tf.image.resize(image, [pp.resolution, pp.resolution]),
    'central_crop': _central_crop,
}


def train_preprocess(pp) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """(decoded uint8 [H, W, 3] image, stateless seed [2]) -> float32 [R, R, 3] in [-1, 1]."""
  crop = TRAIN_CROPS[pp.train]

  def preprocess(image, seed):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = crop(image, crop_seed, pp)
    return normalize(tf.image.stateless_random_flip_left_right(image, flip_seed))

  return preprocess


def eval_preprocess(pp) -> Callable[[tf.Tensor], tf.Tensor]:
  """Decoded uint8 [(N,) H, W, 3] images -> float32 [(N,) R, R, 3] in [-1, 1]."""
  resize = EVAL_RESIZES[pp.eval]
  return lambda image: normalize(resize(image, pp))


def eval_image(encoded: tf.Tensor, pp) -> tf.Tensor:
  """Encoded image bytes -> float32 [R, R, 3]: what evaluation and every inference command feed
  the model."""
  return eval_preprocess(pp)(decode(encoded))

"""Exports a ViT classifier as a TensorFlow SavedModel, verified against the JAX model.

  python -m vit_jax.export --checkpoint=WORKDIR --out=DIR
  python -m vit_jax.export --model=ViT-B_16 --checkpoint=model.npz --out=DIR [--resolution=384]

The model is serialised as StableHLO (jax2tf) for each of --platforms, its parameters as
variables. The signatures, and how the reloaded SavedModel is compared with the JAX model before
it replaces --out: README "Exporting a SavedModel".
"""
import uuid
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging
import jax
from jax.experimental import jax2tf
import jax.numpy as jnp
import numpy as np
import scipy.special
import tensorflow as tf

from vit_jax import cli
from vit_jax import inference
from vit_jax import models
from vit_jax import output_check
from vit_jax import preprocessing

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
SIGNATURES = ('serving_default', 'serving_float')
# Largest |exported - JAX| logit allowed, as a fraction of max(1, largest |JAX logit|). bfloat16
# rounding differs between XLA versions and fusions by about 1% of the logit scale.
LOGIT_TOLERANCES = {'float32': 1e-4, 'bfloat16': 5e-2}
# Largest |probabilities - softmax(logits)| allowed within one exported output.
PROBABILITY_TOLERANCE = 1e-5
NUM_VERIFICATION_IMAGES = 3


class VerificationError(cli.UserError):
  """The reloaded SavedModel does not compute what the JAX model computes."""


def build_serving_module(model: models.VisionTransformer, params: Mapping[str, Any],
                         resolution: int, platforms: Sequence[str]) -> tf.Module:
  """A tf.Module holding the params as variables and the two serving signatures."""
  param_vars = tf.nest.map_structure(
      lambda p: tf.Variable(np.asarray(p, np.float32), trainable=False), dict(params))

  def predict(params, images):
    logits = model.apply({'params': params}, images, train=False)
    return {'logits': logits, 'probabilities': jax.nn.softmax(logits, axis=-1)}

  predict_tf = jax2tf.convert(predict, polymorphic_shapes=[None, '(batch, ...)'],
                              with_gradient=False,
                              native_serialization_platforms=tuple(platforms))
  shape = [None, resolution, resolution, 3]

  @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name='images')],
               autograph=False)
  def serving_float(images):
    return predict_tf(param_vars, images)

  @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8, name='images')],
               autograph=False)
  def serving_default(images):
    # The eval pipeline's scaling (its resize leaves an image already at the resolution as is).
    return serving_float(preprocessing.normalize(images))

  module = tf.Module()
  module.params = param_vars
  module.serving_default = serving_default
  module.serving_float = serving_float
  return module


def verification_images(resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic noise images: uint8 [3, R, R, 3], and scaled to [-1, 1] as serving_default
  scales them."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_VERIFICATION_IMAGES, resolution, resolution, 3), np.uint8)
  return images, preprocessing.normalize(tf.constant(images)).numpy()


def jax_logits(model: models.VisionTransformer, params: Mapping[str, Any],
               images: np.ndarray) -> np.ndarray:
  """The JAX model's logits of float images in [-1, 1]."""
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, images))


def verify_saved_model(path: str, resolution: int, want: np.ndarray,
                       logit_tolerance: float) -> float:
  """Runs both signatures of the SavedModel at `path` on `verification_images`: VerificationError
  unless the logits match `want` (the JAX model's) within `logit_tolerance` * max(1, largest
  |logit|) and the probabilities are their softmax. Returns the largest logit difference."""
  images, scaled = verification_images(resolution)
  bound = logit_tolerance * max(1.0, float(np.max(np.abs(want))))
  loaded = tf.saved_model.load(path)
  largest = 0.0
  for name, inputs in (('serving_default', images), ('serving_float', scaled)):
    outputs = loaded.signatures[name](images=tf.constant(inputs))
    logits, probabilities = outputs['logits'].numpy(), outputs['probabilities'].numpy()
    if logits.shape != want.shape or probabilities.shape != want.shape:
      raise VerificationError(
          f'The SavedModel at {path} returns {name} logits {logits.shape} and probabilities '
          f'{probabilities.shape}; the JAX model {want.shape}.')
    error = float(np.max(np.abs(logits - want)))
    if not error <= bound:  # NaN fails too.
      raise VerificationError(
          f'The SavedModel at {path} does not match the JAX model: {name} logits differ by up to '
          f'{error:.3g} (allowed {bound:.3g}).')
    softmax = scipy.special.softmax(logits.astype(np.float64), axis=-1)
    probability_error = float(np.max(np.abs(probabilities - softmax)))
    if not probability_error <= PROBABILITY_TOLERANCE:
      raise VerificationError(
          f'The SavedModel at {path}: {name} probabilities differ from the softmax of its logits '
          f'by up to {probability_error:.3g}.')
    largest = max(largest, error)
  return largest


def check_out_dir(out: str, overwrite: bool) -> None:
  """--out must not exist, or be a SavedModel (or empty) folder and --overwrite be given."""
  if not tf.io.gfile.exists(out):
    return
  if not overwrite:
    raise FileExistsError(f'--out={out} already exists; pass --overwrite to replace it.')
  if not tf.io.gfile.isdir(out):
    raise FileExistsError(f'--out={out} is a file, not a SavedModel folder; not replacing it.')
  contents = tf.io.gfile.listdir(out)
  if contents and 'saved_model.pb' not in contents:
    raise FileExistsError(f'--out={out} is a folder that holds no saved_model.pb; not replacing '
                          'it even with --overwrite.')


def write_verified(model: models.VisionTransformer, params: Mapping[str, Any], resolution: int,
                   want: np.ndarray, fv: flags.FlagValues) -> None:
  """Writes the SavedModel next to --out, verifies it against the JAX logits `want` of the
  verification images and only then moves it to --out."""
  staging = f'{fv.out.rstrip("/")}.partial-{uuid.uuid4().hex[:8]}'
  try:
    module = build_serving_module(model, params, resolution, fv.platforms)
    tf.saved_model.save(module, staging, signatures={name: getattr(module, name)
                                                     for name in SIGNATURES})
    logging.info('Wrote %s; verifying it.', staging)
    difference = verify_saved_model(staging, resolution, want, LOGIT_TOLERANCES[fv.dtype])
    logging.info('Verified: largest logit difference to JAX %.3g on %d images.', difference,
                 NUM_VERIFICATION_IMAGES)
    if tf.io.gfile.exists(fv.out):
      tf.io.gfile.rmtree(fv.out)
    tf.io.gfile.rename(staging, fv.out)
  finally:
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defined by the program only, so that importing this module adds no flags elsewhere."""
  flags.DEFINE_string('model', None, 'Model name (vit_jax.model_configs); needed for an .npz, and '
                      'for a workdir it must be the one in its config.json.', flag_values=fv)
  flags.DEFINE_string('checkpoint', None, 'Released-layout .npz file or training workdir.',
                      flag_values=fv)
  flags.DEFINE_integer('resolution', None, "Input size R; default: the checkpoint's own (a "
                       "workdir's pp.resolution, else the position-embedding grid's). Another size "
                       'interpolates the position embeddings.', lower_bound=1, flag_values=fv)
  flags.DEFINE_string('out', None, 'Folder to write the SavedModel to.', flag_values=fv)
  flags.DEFINE_integer('num_classes', None, "Number of classes, checked against the checkpoint's "
                       'head; default: the size of that head.', lower_bound=1, flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', list(models.DTYPES),
                    'Compute dtype (parameters stay float32).', flag_values=fv)
  flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                    f'Platforms to serialise the model for, among {", ".join(PLATFORMS)}.',
                    flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it holds a SavedModel.', flag_values=fv)
  flags.mark_flags_as_required(['checkpoint', 'out'], flag_values=fv)
  flags.register_validator(
      'platforms', lambda value: bool(value) and set(value) <= set(PLATFORMS),
      f'--platforms must be a non-empty comma-separated subset of {",".join(PLATFORMS)}.',
      flag_values=fv)


def run(fv: flags.FlagValues) -> None:
  """Loads the checkpoint, checks that its logits of the verification images are finite (a
  SavedModel of it would serve Inf logits and NaN probabilities) and exports it."""
  check_out_dir(fv.out, fv.overwrite)
  loaded = inference.load_model(fv.checkpoint, model_name=fv.model, resolution=fv.resolution)
  if not loaded.num_classes:
    raise ValueError(f'Checkpoint {loaded.source} has no classification head (head/kernel), so '
                     'there is nothing to export as a classifier.')
  if fv.num_classes and fv.num_classes != loaded.num_classes:
    raise ValueError(f'--num_classes={fv.num_classes} but the head of checkpoint {loaded.source} '
                     f'has {loaded.num_classes} classes.')
  model = models.build_model(loaded.model_config, loaded.num_classes, dtype=jnp.dtype(fv.dtype))
  scaled = verification_images(loaded.resolution)[1]
  want = jax_logits(model, loaded.params, scaled)
  output_check.check_finite(want, f'Checkpoint {loaded.source}', model=model,
                            params=loaded.params, images=scaled)
  logging.info('Exporting %s (%s, %d classes, %dx%d, %s) for %s to %s.', loaded.source,
               loaded.name, loaded.num_classes, loaded.resolution, loaded.resolution, fv.dtype,
               ','.join(fv.platforms), fv.out)
  write_verified(model, loaded.params, loaded.resolution, want, fv)
  logging.info('Saved %s with signatures %s.', fv.out, ', '.join(SIGNATURES))


def main(argv: Sequence[str]) -> None:
  cli.check_no_arguments(argv)
  run(flags.FLAGS)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

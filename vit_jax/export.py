"""Exports a ViT classifier as a TensorFlow SavedModel and checks it against the JAX model.

Usage:
  python -m vit_jax.export --model=ViT-B_16 --checkpoint=model.npz --out=DIR [--resolution=384]
  python -m vit_jax.export --checkpoint=WORKDIR --out=DIR   # model, resolution from config.json

The checkpoint is read by `vit_jax.inference.load_model`, which names every parameter that does
not fit the model (missing, unexpected or mis-shaped, with both shapes).

Signatures of the SavedModel (the batch size is dynamic; R is the resolution, C the classes):
  serving_default  images: uint8   [batch, R, R, 3]  RGB values 0..255
  serving_float    images: float32 [batch, R, R, 3]  RGB already scaled to [-1, 1]
both returning
  logits:          float32 [batch, C]
  probabilities:   float32 [batch, C]  softmax of the logits.
Images must already be R x R (resize / crop before calling, e.g. with
`vit_jax.preprocessing.eval_preprocess`). uint8 images are scaled as in evaluation,
(x - 127.5) / 127.5.

The JAX computation is serialised as StableHLO (jax2tf native serialisation) for each of
--platforms; the parameters are SavedModel variables, so models of any size can be saved. With
--dtype=bfloat16 the model computes in bfloat16 (parameters stay float32, outputs are float32).

The SavedModel is written next to --out, loaded back with `tf.saved_model.load` and both
signatures are compared with the JAX model on deterministic random images (on this machine's
platform): logits within 1e-4 (float32) or 5e-2 (bfloat16, whose rounding differs between XLA
builds) of max(1, largest |logit|), probabilities equal to their softmax. Only a model that
matches is moved to --out; on a mismatch (a NaN difference is one) the command fails and --out
is left as it was. Before anything is written, the JAX model's logits of those images must be
finite (vit_jax.output_check).
"""
import uuid
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging
import jax
from jax.experimental import jax2tf
import jax.numpy as jnp
import numpy as np
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


def preprocess_uint8(images: tf.Tensor) -> tf.Tensor:
  """uint8 RGB 0..255 -> float32 in [-1, 1]: the eval pipeline's scaling (of an image already at
  the resolution, which its resize leaves as it is)."""
  return preprocessing.normalize(images)


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
    return serving_float(preprocess_uint8(images))

  module = tf.Module()
  module.params = param_vars
  module.serving_default = serving_default
  module.serving_float = serving_float
  return module


def verification_images(resolution: int) -> np.ndarray:
  """Deterministic uint8 [3, R, R, 3] noise images."""
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (NUM_VERIFICATION_IMAGES, resolution, resolution, 3), np.uint8)


def jax_logits(model: models.VisionTransformer, params: Mapping[str, Any],
               images: np.ndarray) -> np.ndarray:
  """The JAX model's logits of float images in [-1, 1]."""
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, images))


def check_outputs(model: models.VisionTransformer, params: Mapping[str, Any], resolution: int,
                  source: str) -> None:
  """NonFiniteOutputError (vit_jax.output_check) unless the model's logits of the verification
  images are finite: a SavedModel of it would serve Inf logits and NaN probabilities."""
  scaled = preprocess_uint8(tf.constant(verification_images(resolution))).numpy()
  output_check.check_finite(jax_logits(model, params, scaled), source, model=model,
                            params=params, images=scaled)


def verify_saved_model(path: str, model: models.VisionTransformer, params: Mapping[str, Any],
                       resolution: int, logit_tolerance: float) -> float:
  """Loads the SavedModel at `path` and runs both signatures on `verification_images`: the
  logits must match the JAX model's within `logit_tolerance` * max(1, largest |logit|), and the
  probabilities must be their softmax. Returns the largest logit difference; raises
  VerificationError otherwise."""
  images = verification_images(resolution)
  scaled = preprocess_uint8(tf.constant(images)).numpy()
  want = jax_logits(model, params, scaled)
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
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
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


def export(model: models.VisionTransformer, params: Mapping[str, Any], resolution: int,
           out: str, *, overwrite: bool, platforms: Sequence[str],
           logit_tolerance: float, source: str = 'The model') -> None:
  """Checks the model's outputs (`check_outputs`; `source` names it), writes the SavedModel next
  to `out`, verifies it and only then moves it to `out`."""
  check_out_dir(out, overwrite)
  check_outputs(model, params, resolution, source)
  staging = f'{out.rstrip("/")}.partial-{uuid.uuid4().hex[:8]}'
  try:
    module = build_serving_module(model, params, resolution, platforms)
    tf.saved_model.save(module, staging, signatures={name: getattr(module, name)
                                                     for name in SIGNATURES})
    logging.info('Wrote %s; verifying it.', staging)
    difference = verify_saved_model(staging, model, params, resolution, logit_tolerance)
    logging.info('Verified: largest logit difference to JAX %.3g on %d images.', difference,
                 NUM_VERIFICATION_IMAGES)
    if tf.io.gfile.exists(out):
      tf.io.gfile.rmtree(out)
    tf.io.gfile.rename(staging, out)
  finally:
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags; defined only when this module runs as the program, so that importing
  it adds no flags to other programs."""
  flags.DEFINE_string('model', None, 'Model name (vit_jax.model_configs); needed for an .npz, and '
                      'for a workdir it must be the one in its config.json.',
                      flag_values=flag_values)
  flags.DEFINE_string('checkpoint', None, 'Released-layout .npz file or training workdir.',
                      flag_values=flag_values)
  flags.DEFINE_integer('resolution', None, "Input size R; default: the checkpoint's own (a "
                       "workdir's pp.resolution, else the position-embedding grid's). Another size "
                       'interpolates the position embeddings.', lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_string('out', None, 'Folder to write the SavedModel to.', flag_values=flag_values)
  flags.DEFINE_integer('num_classes', None, "Number of classes, checked against the checkpoint's "
                       'head; default: the size of that head.', lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_enum('dtype', 'float32', list(models.DTYPES),
                    'Compute dtype (parameters stay float32).',
                    flag_values=flag_values)
  flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                    f'Platforms to serialise the model for, among {", ".join(PLATFORMS)}.',
                    flag_values=flag_values)
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it holds a SavedModel.',
                    flag_values=flag_values)
  flags.mark_flags_as_required(['checkpoint', 'out'], flag_values=flag_values)
  flags.register_validator(
      'platforms', lambda value: bool(value) and set(value) <= set(PLATFORMS),
      f'--platforms must be a non-empty comma-separated subset of {",".join(PLATFORMS)}.',
      flag_values=flag_values)


def run(flag_values: flags.FlagValues) -> None:
  """Loads the checkpoint, builds the model and exports it, as the flags say."""
  fv = flag_values
  check_out_dir(fv.out, fv.overwrite)
  loaded = inference.load_model(fv.checkpoint, model_name=fv.model, resolution=fv.resolution)
  if not loaded.num_classes:
    raise ValueError(f'Checkpoint {loaded.source} has no classification head (head/kernel), so '
                     'there is nothing to export as a classifier.')
  if fv.num_classes and fv.num_classes != loaded.num_classes:
    raise ValueError(f'--num_classes={fv.num_classes} but the head of checkpoint {loaded.source} '
                     f'has {loaded.num_classes} classes.')
  num_classes = loaded.num_classes
  model = models.build_model(loaded.model_config, num_classes, dtype=jnp.dtype(fv.dtype))
  logging.info('Exporting %s (%s, %d classes, %dx%d, %s) for %s to %s.', loaded.source,
               loaded.name, num_classes, loaded.resolution, loaded.resolution, fv.dtype,
               ','.join(fv.platforms), fv.out)
  export(model, loaded.params, loaded.resolution, fv.out, overwrite=fv.overwrite,
         platforms=fv.platforms, logit_tolerance=LOGIT_TOLERANCES[fv.dtype],
         source=f'Checkpoint {loaded.source}')
  logging.info('Saved %s with signatures %s.', fv.out, ', '.join(SIGNATURES))


def main(argv: Sequence[str]) -> None:
  cli.check_no_arguments(argv)
  run(flags.FLAGS)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""SavedModel export: signatures, numerics against the JAX model, and the command's errors."""
import json
import os

from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from vit_jax import export
from vit_jax import model_configs
from vit_jax import models

RESOLUTION = 32
NUM_CLASSES = 5


def _hybrid_config():
  config = model_configs.get_model_config('micro')
  config.resnet = {'num_layers': (1,), 'width_factor': 1}
  config.patches.size = (1, 1)
  return config


def _random_params(config, num_classes=NUM_CLASSES, seed=0):
  """Normal noise in the model's parameter shapes (nothing zero, unlike the head at init)."""
  model = models.build_model(config, num_classes)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
      jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: rng.normal(0, 0.2, p.shape).astype(np.float32), shapes)


def _save_npz(path, params):
  np.savez(path, **traverse_util.flatten_dict(params, sep='/'))
  return str(path)


def _make_workdir(path, config, params):
  os.makedirs(path)
  run_config = {'model_name': config.model_name, 'model': config.to_dict(),
                'num_classes': NUM_CLASSES, 'pp': {'resolution': RESOLUTION}}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(run_config, f)
  _save_npz(os.path.join(path, 'model.npz'), params)
  return str(path)


def _parse_flags(**values):
  flag_values = flags.FlagValues()
  export.define_flags(flag_values)
  flag_values(['export'] + [f'--{k}={v}' for k, v in values.items()])
  return flag_values


def _jax_outputs(config, params, images):
  """Logits and probabilities of the float32 JAX model on uint8 images."""
  model = models.build_model(config, NUM_CLASSES)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  logits = np.asarray(apply(params, (images.astype(np.float32) - 127.5) / 127.5))
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  return logits, probabilities / probabilities.sum(-1, keepdims=True)


def _uint8_images(batch, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (batch, RESOLUTION, RESOLUTION, 3), np.uint8)


@pytest.fixture(scope='module')
def vit(tmp_path_factory):
  config = model_configs.get_model_config('micro')
  params = _random_params(config)
  return config, params, _save_npz(tmp_path_factory.mktemp('vit') / 'vit.npz', params)


@pytest.fixture(scope='module')
def hybrid_workdir(tmp_path_factory):
  config = _hybrid_config()
  params = _random_params(config, seed=1)
  return config, params, _make_workdir(tmp_path_factory.mktemp('hybrid') / 'workdir', config,
                                       params)


def _check_saved_model(out, config, params):
  loaded = tf.saved_model.load(out)
  assert set(loaded.signatures) == {'serving_default', 'serving_float'}
  for name, input_dtype in (('serving_default', tf.uint8), ('serving_float', tf.float32)):
    signature = loaded.signatures[name]
    assert signature.structured_input_signature == ((), {
        'images': tf.TensorSpec([None, RESOLUTION, RESOLUTION, 3], input_dtype, name='images')})
    assert signature.structured_outputs == {
        key: tf.TensorSpec([None, NUM_CLASSES], tf.float32, name=key)
        for key in ('logits', 'probabilities')}
  images = _uint8_images(3)
  logits, probabilities = _jax_outputs(config, params, images)
  for batch in (1, 3):  # The model treats examples independently, so slices must agree.
    for name, inputs in (('serving_default', images[:batch]),
                         ('serving_float', (images[:batch].astype(np.float32) - 127.5) / 127.5)):
      outputs = loaded.signatures[name](images=tf.constant(inputs))
      np.testing.assert_allclose(outputs['logits'].numpy(), logits[:batch], atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(outputs['probabilities'].numpy(), probabilities[:batch],
                                 atol=1e-5)


def test_vit_npz_export_at_its_own_resolution_matches_jax_on_every_default_platform(vit,
                                                                                    tmp_path):
  config, params, npz = vit
  out = str(tmp_path / 'saved')
  export.run(_parse_flags(model='micro', checkpoint=npz, out=out))
  _check_saved_model(out, config, params)
  assert os.listdir(tmp_path) == ['saved']  # No staging folder left behind.


def test_hybrid_workdir_export_matches_jax(hybrid_workdir, tmp_path):
  config, params, workdir = hybrid_workdir
  out = str(tmp_path / 'saved')
  export.run(_parse_flags(checkpoint=workdir, out=out, platforms='cpu'))
  _check_saved_model(out, config, params)


def test_bfloat16_export_over_an_existing_saved_model(vit, tmp_path):
  config, params, npz = vit
  out = tmp_path / 'saved'
  out.mkdir()
  (out / 'saved_model.pb').write_bytes(b'an older export')
  (out / 'stale.txt').write_text('from the older export')
  export.run(_parse_flags(model='micro', checkpoint=npz, out=out, dtype='bfloat16',
                          platforms='cpu', overwrite='true'))
  assert 'stale.txt' not in os.listdir(out)
  loaded = tf.saved_model.load(str(out))
  images = _uint8_images(3)
  logits = loaded.signatures['serving_default'](images=tf.constant(images))['logits'].numpy()
  f32_logits, _ = _jax_outputs(config, params, images)
  # Close to the float32 model, but not equal to it: the export computes in bfloat16.
  assert 1e-4 < np.max(np.abs(logits - f32_logits)) < 2e-2


def test_existing_out_is_kept_without_overwrite_or_when_not_a_saved_model(vit, tmp_path):
  _, _, npz = vit
  out = tmp_path / 'saved'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  args = dict(model='micro', checkpoint=npz, out=out)
  with pytest.raises(FileExistsError, match=f'--out={out} already exists; pass --overwrite'):
    export.run(_parse_flags(**args))
  with pytest.raises(FileExistsError, match='no saved_model.pb'):
    export.run(_parse_flags(overwrite='true', **args))
  assert os.listdir(out) == ['notes.txt']


def test_verification_mismatch_fails_and_leaves_out_untouched(vit, tmp_path, monkeypatch):
  _, _, npz = vit
  build = export.build_serving_module

  def build_with_other_params(model, params, *args):
    return build(model, jax.tree.map(lambda p: p * 1.01, params), *args)

  monkeypatch.setattr(export, 'build_serving_module', build_with_other_params)
  with pytest.raises(export.VerificationError, match='serving_default logits'):
    export.run(_parse_flags(model='micro', checkpoint=npz, out=tmp_path / 'saved',
                            platforms='cpu'))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('change,offending', [
    (dict(reshape='Transformer/encoder_norm/scale'),
     ['Transformer/encoder_norm/scale', '(8,)', '(16,)']),
    (dict(drop='Transformer/encoder_norm/bias'), ['Transformer/encoder_norm/bias', '(16,)']),
    (dict(add='Transformer/extra/bias'), ['Transformer/extra/bias', '(16,)']),
    (dict(model='ViT-Ti_16'), ['embedding/kernel', '(16, 16, 3, 16)', '(16, 16, 3, 192)']),
])
def test_checkpoint_that_does_not_fit_names_every_offending_key(vit, tmp_path, change, offending):
  _, params, _ = vit
  change = dict(change)
  flat = traverse_util.flatten_dict(params, sep='/')
  if 'reshape' in change:
    flat[change.pop('reshape')] = np.ones(8, np.float32)
  if 'drop' in change:
    del flat[change.pop('drop')]
  if 'add' in change:
    flat[change.pop('add')] = np.ones(16, np.float32)
  npz = _save_npz(tmp_path / 'changed.npz', traverse_util.unflatten_dict(flat, sep='/'))
  args = dict(model='micro', checkpoint=npz, out=tmp_path / 'saved')
  with pytest.raises(ValueError, match=f'Checkpoint {npz} does not fit') as error:
    export.run(_parse_flags(**{**args, **change}))
  line = next(line for line in str(error.value).splitlines() if offending[0] in line)
  for text in offending[1:]:
    assert text in line
  assert not (tmp_path / 'saved').exists()


def test_checkpoint_argument_errors_name_the_path_or_flag(vit, hybrid_workdir, tmp_path):
  _, params, npz = vit
  out = tmp_path / 'saved'
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/missing.npz does not exist'):
    export.run(_parse_flags(model='micro', checkpoint=tmp_path / 'missing.npz', out=out))
  with pytest.raises(ValueError, match='--model'):
    export.run(_parse_flags(checkpoint=npz, out=out))
  with pytest.raises(ValueError, match='--model=b16 but .* trained micro'):
    export.run(_parse_flags(model='b16', checkpoint=hybrid_workdir[2], out=out))
  with pytest.raises(ValueError, match=f'--num_classes=7 but the head of checkpoint {npz} has 5'):
    export.run(_parse_flags(model='micro', checkpoint=npz, out=out, num_classes=7))
  workdir = tmp_path / 'unfinished'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"model_name": "micro"}')
  with pytest.raises(FileNotFoundError, match=f'{workdir} has no model.npz'):
    export.run(_parse_flags(checkpoint=workdir, out=out))
  headless = {k: v for k, v in params.items() if k != 'head'}
  with pytest.raises(ValueError, match='no classification head'):
    export.run(_parse_flags(model='micro', checkpoint=_save_npz(tmp_path / 'h.npz', headless),
                            out=out))
  assert not out.exists()


def test_flags_are_all_defined_and_platforms_validated():
  flag_values = flags.FlagValues()
  export.define_flags(flag_values)
  assert set(flag_values) == {'model', 'checkpoint', 'resolution', 'out', 'num_classes', 'dtype',
                              'platforms', 'overwrite'}
  with pytest.raises(flags.IllegalFlagValueError, match='--platforms must be'):
    flag_values(['export', '--checkpoint=c', '--out=o', '--platforms=cpu,gpu'])


def test_an_existing_out_is_refused_before_loading(vit, tmp_path):
  _, _, npz = vit
  (tmp_path / 'saved').mkdir()
  flag_values = _parse_flags(model='micro', checkpoint=npz, out=tmp_path / 'saved')
  with pytest.raises(FileExistsError) as error:
    export.run(flag_values)
  assert str(error.value) == (f'--out={tmp_path}/saved already exists; pass --overwrite to '
                              'replace it.')

"""The ResNet alone (BiT baseline, the official `VisionTransformer(transformer=None)`): layout,
parameter counts, and a forward pass against a plain numpy ResNet."""
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_official_numerics as official
from vit_jax import config_lib
from vit_jax import flops
from vit_jax import model_configs
from vit_jax import models


def _shapes(cfg, num_classes, resolution):
  model = models.build_model(cfg, num_classes)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                             jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32))
  return {k: v.shape for k, v in traverse_util.flatten_dict(variables['params'], sep='/').items()}


def _count_by_hand(num_layers, num_classes, width=64):
  """Bias-free convs, 2C per GroupNorm, projection in the first unit of each stage, head."""
  total = 7 * 7 * 3 * width + 2 * width
  c_in = width
  for stage, units in enumerate(num_layers):
    f = width * 2**stage
    for unit in range(units):
      total += c_in * f + 9 * f * f + f * 4 * f + 2 * (f + f + 4 * f)
      if unit == 0:
        total += c_in * 4 * f + 2 * 4 * f
      c_in = 4 * f
  return total + c_in * num_classes + num_classes


@pytest.mark.parametrize('name,count', [
    # ResNet-50 / -101 (v1 layout, bias-free convs): 25,557,032 / 44,549,160 parameters with
    # 1000 classes, the well-known counts; GroupNorm has BatchNorm's 2C affine parameters.
    ('BiT-R50x1', 25_557_032), ('BiT-R101x1', 44_549_160), ('BiT-R26x1', None)])
def test_parameter_counts(name, count):
  cfg = model_configs.get_model_config(name)
  shapes = _shapes(cfg, 1000, 224)
  total = sum(math.prod(s) for s in shapes.values())
  assert total == _count_by_hand(cfg.resnet.num_layers, 1000)
  if count is not None:
    assert total == count
  assert not any(k.startswith(('embedding', 'Transformer', 'cls')) for k in shapes)
  assert shapes['head/kernel'] == (2048, 1000)
  assert {'conv_root/kernel', 'gn_root/scale', 'block4/unit2/conv3/kernel',
          'block1/unit1/conv_proj/kernel', 'block1/unit1/gn_proj/bias'} <= shapes.keys()


def _np_resnet(x, p, num_layers):
  """The float64 numpy ResNet of tests/test_official_numerics.py (official weight
  standardisation), then global average pooling and the head."""
  x = official._np_resnet(x, p, num_layers, official._np_std_weights)  # pylint: disable=protected-access
  return x.mean(axis=(1, 2)) @ p['head']['kernel'] + p['head']['bias']


def _standardised(kernel):
  """Kernels with mean 0 and std 1 per output filter: weight standardisation leaves them as they
  are (up to its eps), whichever of the usual formulas the model uses."""
  kernel = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
  return kernel / kernel.std(axis=(0, 1, 2), keepdims=True)


def test_forward_matches_numpy_resnet():
  cfg = model_configs.bit('tiny', (1, 2), width_factor=0.5)
  model = models.build_model(cfg, 5)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 18, 18, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), x, train=False)['params']
  params = traverse_util.unflatten_dict({
      k: (_standardised(rng.normal(size=v.shape)) if k[-1] == 'kernel' and v.ndim == 4
          else rng.normal(size=v.shape) * 0.5).astype(np.float32)
      for k, v in traverse_util.flatten_dict(params).items()})
  out = model.apply({'params': params}, x, train=False)
  expected = _np_resnet(x.astype(np.float64), jax.tree.map(np.float64, params), (1, 2))
  assert out.shape == (2, 5)
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
  features = models.build_model(cfg, 0).apply({'params': params}, x, train=False)
  assert features.shape == (2, 256)  # Pooled features of the last stage (4 x 64 channels).


def test_any_resolution_validates_and_flops_agree_with_xla():
  cfg = model_configs.bit('tiny', (1, 1), width_factor=0.5)
  config = config_lib.base_config()
  config.model, config.pp.resolution, config.batch, config.batch_eval = cfg, 28, 8, 8
  config_lib.validate(config, num_devices=1, process_count=1)  # 28 is no multiple of 8.
  model = models.build_model(cfg, 10)
  images = jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  xla = compiled.compile().cost_analysis()['flops']
  assert 0.8 * xla <= flops.forward_flops(cfg, 28, 10) <= xla


def test_token_classifier_without_transformer_is_a_clear_error():
  cfg = model_configs.get_model_config('BiT-R26x1')
  cfg.classifier = 'token'
  with pytest.raises(ValueError, match="classifier must be 'gap'"):
    models.build_model(cfg, 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                     train=False)


def test_scan_layout_conversion_leaves_a_resnet_tree_alone():
  params = {'conv_root': {'kernel': np.zeros((7, 7, 3, 64))}, 'head': {'bias': np.zeros(3)}}
  assert models.stack_encoder_blocks(params) == params
  assert models.unstack_encoder_blocks(params) == params


def test_official_layout_with_an_embedding_conv_before_pooling():
  # The official transformer=None model with hidden_size set: stages -> `embedding` -> GAP.
  cfg = model_configs.bit('tiny', (1,), width_factor=0.5)
  cfg.hidden_size, cfg.patches = 8, {'size': (1, 1)}
  shapes = _shapes(cfg, 5, 16)
  assert shapes['embedding/kernel'] == (1, 1, 128, 8) and shapes['head/kernel'] == (8, 5)
  by_hand = _count_by_hand((1,), 5, width=32) - (128 * 5 + 5) + (128 * 8 + 8) + (8 * 5 + 5)
  assert sum(math.prod(s) for s in shapes.values()) == by_hand

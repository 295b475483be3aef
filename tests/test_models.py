"""Models: parameter layout and counts, forward shapes, dtypes, dropout and numerics."""
import math
import re

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import flops
from vit_jax import model_configs
from vit_jax import models


def _param_shapes(name, num_classes=1000, resolution=224):
  model = models.build_model(models.MODEL_CONFIGS[name], num_classes)
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  return {k: v.shape for k, v in
          traverse_util.flatten_dict(variables['params'], sep='/').items()}


@pytest.mark.parametrize('name,count', [
    ('ViT-Ti_16', 5_717_416), ('ViT-S_16', 22_050_664), ('ViT-B_16', 86_567_656),
    ('ViT-B_32', 88_224_232), ('ViT-L_16', 304_326_632), ('ViT-H_14', 632_045_800),
    ('R50+ViT-B_16', 98_659_112),
])
def test_parameter_counts_at_224_with_1000_classes(name, count):
  shapes = _param_shapes(name)
  assert sum(math.prod(s) for s in shapes.values()) == count


def _expected_vit_shapes(cfg, num_classes, tokens, in_channels=3):
  """The released layout, written out from the issue's description."""
  d, p = cfg.hidden_size, cfg.patches.size[0]
  heads, mlp = cfg.transformer.num_heads, cfg.transformer.mlp_dim
  shapes = {
      'embedding/kernel': (p, p, in_channels, d), 'embedding/bias': (d,),
      'Transformer/posembed_input/pos_embedding': (1, tokens, d),
      'Transformer/encoder_norm/scale': (d,), 'Transformer/encoder_norm/bias': (d,),
      'head/kernel': (cfg.representation_size or d, num_classes), 'head/bias': (num_classes,),
  }
  if cfg.classifier in ('token', 'token_unpooled'):
    shapes['cls'] = (1, 1, d)
  if cfg.representation_size:
    shapes['pre_logits/kernel'] = (d, cfg.representation_size)
    shapes['pre_logits/bias'] = (cfg.representation_size,)
  for i in range(cfg.transformer.num_layers):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      shapes[b + ln + '/scale'] = shapes[b + ln + '/bias'] = (d,)
    for qkv in ('query', 'key', 'value'):
      shapes[f'{b}MultiHeadDotProductAttention_1/{qkv}/kernel'] = (d, heads, d // heads)
      shapes[f'{b}MultiHeadDotProductAttention_1/{qkv}/bias'] = (heads, d // heads)
    shapes[b + 'MultiHeadDotProductAttention_1/out/kernel'] = (heads, d // heads, d)
    shapes[b + 'MultiHeadDotProductAttention_1/out/bias'] = (d,)
    shapes[b + 'MlpBlock_3/Dense_0/kernel'] = (d, mlp)
    shapes[b + 'MlpBlock_3/Dense_0/bias'] = (mlp,)
    shapes[b + 'MlpBlock_3/Dense_1/kernel'] = (mlp, d)
    shapes[b + 'MlpBlock_3/Dense_1/bias'] = (d,)
  return shapes


def _expected_resnet_shapes(num_layers, width=64):
  shapes = {'conv_root/kernel': (7, 7, 3, width), 'gn_root/scale': (width,),
            'gn_root/bias': (width,)}
  c_in = width
  for s, units in enumerate(num_layers):
    f = width * 2**s
    for u in range(units):
      b = f'block{s + 1}/unit{u + 1}/'
      shapes.update({b + 'conv1/kernel': (1, 1, c_in, f), b + 'conv2/kernel': (3, 3, f, f),
                     b + 'conv3/kernel': (1, 1, f, 4 * f)})
      for gn, c in (('gn1', f), ('gn2', f), ('gn3', 4 * f)):
        shapes[b + gn + '/scale'] = shapes[b + gn + '/bias'] = (c,)
      if u == 0:
        shapes[b + 'conv_proj/kernel'] = (1, 1, c_in, 4 * f)
        shapes[b + 'gn_proj/scale'] = shapes[b + 'gn_proj/bias'] = (4 * f,)
      c_in = 4 * f
  return shapes, c_in


@pytest.mark.parametrize('name', sorted(models.MODEL_CONFIGS))
def test_every_variant_has_the_released_layout(name):
  cfg = models.MODEL_CONFIGS[name]
  resolution, num_classes = 224, 21843
  expected, channels, stride = {}, 3, 1
  if cfg.resnet is not None:
    expected, channels = _expected_resnet_shapes(cfg.resnet.num_layers,
                                                 int(64 * cfg.resnet.width_factor))
    stride = 4 * 2**max(len(cfg.resnet.num_layers) - 1, 0)
  if cfg.transformer is None:  # The ResNet alone: stages, then the head on the pooled features.
    expected.update({'head/kernel': (channels, num_classes), 'head/bias': (num_classes,)})
    assert _param_shapes(name, num_classes, resolution) == expected
    return
  grid = resolution // stride // cfg.patches.size[0]
  tokens = grid * grid + (cfg.classifier in ('token', 'token_unpooled'))
  expected.update(_expected_vit_shapes(cfg, num_classes, tokens, channels))
  assert _param_shapes(name, num_classes, resolution) == expected


def test_released_i21k_parameter_count_with_pre_logits():
  # PAPER.md: ViT-B/16 with 21,843 classes and pre_logits has 103,186,515 parameters.
  cfg = model_configs.get_model_config('ViT-B_16')
  cfg.representation_size = 768
  model = models.build_model(cfg, 21843)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert sum(x.size for x in jax.tree.leaves(variables)) == 103_186_515


def _testing_model(**overrides):
  cfg = model_configs.get_model_config('micro')
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.mark.parametrize('classifier,rep,num_classes,expected', [
    ('token', None, 10, (2, 10)),
    ('gap', None, 10, (2, 10)),
    ('unpooled', None, 10, (2, 4, 10)),
    ('token_unpooled', None, 10, (2, 5, 10)),
    ('token', 24, 10, (2, 10)),
    ('token', 24, 0, (2, 24)),
    ('gap', None, None, (2, 16)),
])
def test_forward_shapes_per_classifier(classifier, rep, num_classes, expected):
  cfg = _testing_model(classifier=classifier, representation_size=rep)
  model = models.build_model(cfg, num_classes)
  x = jnp.zeros((2, 32, 32, 3))
  params = model.init(jax.random.PRNGKey(0), x, train=False)['params']
  out = model.apply({'params': params}, x, train=False)
  assert out.shape == expected
  assert out.dtype == jnp.float32


def test_head_is_zero_initialised_with_configurable_bias():
  model = models.build_model(_testing_model(), 5, head_bias_init=-10.0)
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), x, train=False)['params']
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  np.testing.assert_array_equal(model.apply({'params': params}, x, train=False), -10.0)


def test_hybrid_forward_with_stages_and_root_only():
  for resnet, patch, expected_tokens in (((1, 1), 1, 1 + 4 * 4), ((), 2, 1 + 4 * 4)):
    cfg = _testing_model(patches={'size': (patch, patch)},
                         resnet={'num_layers': resnet, 'width_factor': 1})
    model = models.build_model(cfg, 7)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (2, 7)
    assert variables['params']['Transformer']['posembed_input']['pos_embedding'].shape == (
        1, expected_tokens, 16)
    # gn3 starts at zero, so each unit starts as its (projected) shortcut.
    if resnet:
      np.testing.assert_array_equal(variables['params']['block1']['unit1']['gn3']['scale'], 0.0)


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
  cfg = _testing_model()
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  f32 = models.build_model(cfg, 10)
  params = f32.init(jax.random.PRNGKey(0), x, train=False)['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  bf16 = models.build_model(cfg, 10, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      bf16.init(jax.random.PRNGKey(0), x, train=False)))
  out32 = f32.apply({'params': params}, x, train=False)
  out16 = bf16.apply({'params': params}, x, train=False)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.1, rtol=0.05)
  assert not np.allclose(out16, out32, atol=1e-6)
  half = models.build_model(cfg, 10, param_dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(
      half.init(jax.random.PRNGKey(0), x, train=False)))


def test_dropout_only_in_training():
  cfg = _testing_model()
  cfg.transformer.dropout_rate = 0.5
  model = models.build_model(cfg, 10)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), x, train=False)['params']
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  evaluate = lambda: model.apply({'params': params}, x, train=False)
  np.testing.assert_array_equal(evaluate(), evaluate())
  train = lambda seed: model.apply({'params': params}, x, train=True,
                                   rngs={'dropout': jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  assert not np.allclose(train(0), evaluate())


def _np_layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_gelu(x):
  """GELU's tanh approximation, which the released models use."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_encoder_block(x, p, gelu=_np_gelu):
  """Plain numpy pre-LN block, written from the paper's equations."""
  a = p['MultiHeadDotProductAttention_1']
  y = _np_layer_norm(x, p['LayerNorm_0']['scale'], p['LayerNorm_0']['bias'])
  q, k, v = (np.einsum('btd,dhk->bthk', y, a[n]['kernel']) + a[n]['bias']
             for n in ('query', 'key', 'value'))
  logits = np.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum('bhqt,bthk->bqhk', w, v)
  x = x + np.einsum('bqhk,hkd->bqd', o, a['out']['kernel']) + a['out']['bias']
  m = p['MlpBlock_3']
  y = _np_layer_norm(x, p['LayerNorm_2']['scale'], p['LayerNorm_2']['bias'])
  h = gelu(y @ m['Dense_0']['kernel'] + m['Dense_0']['bias'])
  return x + h @ m['Dense_1']['kernel'] + m['Dense_1']['bias'], w


def test_encoder_block_matches_numpy_reference_and_sows_attention():
  block = models.Encoder1DBlock(mlp_dim=12, num_heads=2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  params = block.init(jax.random.PRNGKey(0), x, deterministic=True)['params']
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.5, params)
  out, state = block.apply({'params': params}, x, deterministic=True, mutable=['intermediates'])
  expected, weights = _np_encoder_block(x.astype(np.float64), jax.tree.map(np.asarray, params))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  (sown,) = state['intermediates']['MultiHeadDotProductAttention_1']['attention_weights']
  np.testing.assert_allclose(sown, weights, rtol=1e-4, atol=1e-5)


def test_attention_weights_of_every_layer_are_sown():
  model = models.build_model(_testing_model(), 10)
  x = jnp.zeros((1, 32, 32, 3))
  params = model.init(jax.random.PRNGKey(0), x, train=False)['params']
  _, state = model.apply({'params': params}, x, train=False, mutable=['intermediates'])
  for i in range(2):
    (w,) = state['intermediates']['Transformer'][f'encoderblock_{i}'][
        'MultiHeadDotProductAttention_1']['attention_weights']
    assert w.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def _param_count(name: str, num_classes: int = 1000, resolution: int = 224):
  params = models.abstract_params(models.MODEL_CONFIGS[name], num_classes, resolution)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def test_testing_is_the_official_one():
  """The official repository's tests: `testing` has 21,390 parameters at 1,000 classes;
  `testing-unpooled` classifies each of the 196 patch tokens at 224px (no class token)."""
  # embedding 16*16*3*10 + 10, cls 10, posemb 197*10, block 2*20 (norms) + 4*110 (q, k, v,
  # out) + 2*110 (MLP), encoder_norm 20, head 10*1000 + 1000.
  assert _param_count('testing') == 7_690 + 10 + 1_970 + 700 + 20 + 11_000 == 21_390
  model = models.build_model(models.MODEL_CONFIGS['testing-unpooled'], 1000)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  assert 'cls' not in variables['params']
  assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape == (
      2, 196, 1000)


def test_unknown_model_and_classifier_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown model 'ViT-X_3'.*ViT-B_16"):
    model_configs.get_model_config('ViT-X_3')
  assert model_configs.get_model_config('r50b16').model_name == 'R50+ViT-B_16'
  model = models.build_model(_testing_model(classifier='cls'), 10)
  with pytest.raises(ValueError, match="Unknown classifier 'cls'"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)


@pytest.mark.parametrize('name', ['micro', 'ViT-B_16', 'R50+ViT-B_16', 'R+ViT-Ti_16'])
def test_analytic_flops_agree_with_xla_cost_analysis(name):
  cfg = models.MODEL_CONFIGS[name]
  model = models.build_model(cfg, 1000)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                             images)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, images).compile()
  xla = compiled.cost_analysis()['flops']
  analytic = flops.forward_flops(cfg, 224)
  # XLA also counts element-wise work that the analytic count leaves out.
  assert 0.85 * xla <= analytic <= xla


def test_flops_of_vit_b16_by_hand():
  # 196 patches + cls = 197 tokens, D=768, MLP=3072, 12 layers, 1000 classes.
  t, d, m = 197, 768, 3072
  per_block = 2 * (t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m)
  expected = 2 * 196 * 16 * 16 * 3 * d + 12 * per_block + 2 * d * 1000
  assert flops.forward_flops(models.MODEL_CONFIGS['ViT-B_16'], 224) == expected


class _EinsumAttention(nn.Module):
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, q, k, v):
    return models.einsum_attention(self, q, k, v, deterministic=True)


def test_einsum_attention_equals_numpy_softmax_attention():
  """The deferred-normalisation, heads-first attention is softmax(q k^T / sqrt(d)) v."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 5, 3, 8)).astype(np.float32) for _ in range(3))
  logits = np.einsum('bqhd,bkhd->bhqk', q.astype(np.float64), k) / np.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum('bhqk,bkhd->bqhd', weights, v)
  out, state = _EinsumAttention().apply({}, q, k, v, mutable=['intermediates'])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  (sown,) = state['intermediates']['attention_weights']
  np.testing.assert_allclose(sown, weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('shape,features,in_axes', [
    ((2, 5, 6), (4,), 1), ((2, 5, 6), (3, 2), 1), ((2, 5, 3, 2), (6,), 2), ((7, 6), (4,), 1)])
def test_token_dense_is_flax_dense_general(shape, features, in_axes):
  """Same parameters (names, shapes, init values) as nn.DenseGeneral over the last `in_axes`
  axes, the same output against numpy, and a gradient program without a transpose on XLA:CPU."""
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  init = dict(kernel_init=nn.initializers.xavier_uniform(),
              bias_init=nn.initializers.normal(stddev=1e-6))
  dense = models.TokenDense(features, in_axes, **init)
  general = nn.DenseGeneral(features, axis=tuple(range(-in_axes, 0)), **init)
  params = dense.init(jax.random.PRNGKey(0), x)
  general_params = general.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(general_params)
  jax.tree.map(np.testing.assert_array_equal, params, general_params)
  assert np.abs(params['params']['bias']).max() > 0  # The bias initialiser ran.
  params = jax.tree.map(
      lambda a: np.random.default_rng(1).standard_normal(a.shape).astype(np.float32), params)
  kernel, bias = (np.asarray(params['params'][k], np.float64) for k in ('kernel', 'bias'))
  n_in = math.prod(shape[len(shape) - in_axes:])
  flat_x = x.reshape(-1, n_in).astype(np.float64)
  expected = (flat_x @ kernel.reshape(n_in, -1)).reshape(*shape[:len(shape) - in_axes],
                                                         *features) + bias
  out = dense.apply(params, x)
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, general.apply(params, x), rtol=1e-5, atol=1e-5)
  upstream = np.random.default_rng(2).standard_normal(expected.shape)
  loss = lambda p: jnp.sum(dense.apply(p, x) * upstream)
  grad = jax.grad(loss)(params)['params']['kernel']
  np.testing.assert_allclose(grad, (flat_x.T @ upstream.reshape(flat_x.shape[0], -1)).reshape(
      kernel.shape), rtol=1e-4, atol=1e-4)
  if jax.default_backend() == 'cpu':
    grad = jax.grad(lambda p, x: jnp.sum(jnp.tanh(dense.apply(p, x)) ** 2))
    program = jax.jit(grad).lower(params, x).compile().as_text().split('ENTRY')[1]
    ops = re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = \S+ (\w+)\(', program, re.M)
    assert [op for _, op in ops].count('dot') == 2, ops  # The forward matmul and the weight gradient.
    assert not [name for name, _ in ops if 'copy' in name or 'transpose' in name], ops


@pytest.mark.parametrize('patch, shape', [((4, 4), (2, 16, 12, 3)), ((4, 3), (1, 18, 11, 3)),
                                          ((1, 1), (2, 3, 5, 6))])
def test_patch_embedding_is_the_strided_valid_convolution(patch, shape):
  """Same parameters (names, shapes, init values) as nn.Conv(stride=kernel, 'VALID'), and the same
  output against a numpy loop over patches, leftover rows and columns dropped."""
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  embed = models.PatchEmbedding(7, patch)
  conv = nn.Conv(7, patch, strides=patch, padding='VALID')
  params = embed.init(jax.random.PRNGKey(0), x)
  conv_params = conv.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(conv_params)
  jax.tree.map(np.testing.assert_array_equal, params, conv_params)
  params = jax.tree.map(
      lambda a: np.random.default_rng(1).standard_normal(a.shape).astype(np.float32), params)
  kernel, bias = (np.asarray(params['params'][k], np.float64) for k in ('kernel', 'bias'))
  (ph, pw), (b, h, w, _) = patch, shape
  expected = np.zeros((b, h // ph, w // pw, 7))
  for i in range(h // ph):
    for j in range(w // pw):
      window = x[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].astype(np.float64)
      expected[:, i, j] = np.einsum('bpqc,pqcd->bd', window, kernel) + bias
  out = embed.apply(params, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, conv.apply(params, x), rtol=1e-5, atol=1e-5)

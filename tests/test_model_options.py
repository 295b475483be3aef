"""The speed switches of vit_jax.models: each gives the same logits, loss and gradients as the
default model (attention_impl, remat_policy, scan_layers), and the scan layout converts exactly
to and from the released layout."""
import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import config_lib
from vit_jax import model_configs
from vit_jax import models
from vit_jax import trainer as trainer_lib

NUM_CLASSES = 10


def _config(num_layers=2, dropout=0.0):
  cfg = model_configs.get_model_config('micro')
  cfg.transformer.num_layers = num_layers
  cfg.transformer.dropout_rate = dropout
  return cfg


def _images(batch=2):
  return jax.random.uniform(jax.random.PRNGKey(1), (batch, 32, 32, 3), minval=-1, maxval=1)


def _params(cfg):
  """Random released-layout params (numpy; a non-zero head, so the logits depend on everything).

  Everything in these tests is jitted or numpy: op-by-op Flax calls compile every op and would
  take minutes on a busy CPU.
  """
  model = models.build_model(cfg, NUM_CLASSES)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          _images(1))['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)


def _logits(model, params, images):
  return jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, images)


def _sown(model, params, images):
  apply = lambda p, x: model.apply({'params': p}, x, train=False, mutable=['intermediates'])[1]
  return jax.jit(apply)(params, images)


def _loss_and_grads_fn(model):
  """jitted (params, images, seed) -> (training loss, grads)."""

  def loss_fn(params, images, seed):
    labels = jnp.arange(images.shape[0]) % NUM_CLASSES
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': jax.random.PRNGKey(seed)})
    return jnp.mean(trainer_lib.cross_entropy(logits, labels, num_classes=NUM_CLASSES))

  return jax.jit(jax.value_and_grad(loss_fn))


def _loss_and_grads(model, params, images, seed=0):
  return _loss_and_grads_fn(model)(params, images, seed)


@functools.lru_cache(maxsize=None)
def _reference(dropout=0.0, seed=0):
  """(params, logits, loss, grads) of the default model, computed once per module."""
  cfg, x = _config(dropout=dropout), _images()
  params = _params(cfg)
  model = models.build_model(cfg, NUM_CLASSES)
  loss, grads = _loss_and_grads(model, params, x, seed)
  logits = _logits(model, params, x) if not dropout else None
  return params, logits, loss, grads


def _assert_trees_close(a, b, **tol):
  a, b = (traverse_util.flatten_dict(t, sep='/') for t in (a, b))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32),
                               err_msg=k, **tol)


def test_defaults_are_the_plain_model_and_options_flow_from_the_model_config():
  model = models.build_model(_config(), NUM_CLASSES)
  assert (model.attention_impl, model.remat_policy, model.scan_layers) == ('xla', 'none', False)
  cfg = _config()
  cfg.remat_policy = 'full'
  cfg.scan_layers = True
  cfg.attention_impl = 'fused'
  model = models.build_model(cfg, NUM_CLASSES)
  assert (model.attention_impl, model.remat_policy, model.scan_layers) == ('fused', 'full', True)
  model = models.build_model(_config(), NUM_CLASSES, remat_policy='dots_saveable')
  assert model.remat_policy == 'dots_saveable'


def test_unknown_options_are_clear_errors():
  x = _images(1)
  for kw, match in ((dict(attention_impl='flash'), "attention_impl='flash'"),
                    (dict(remat_policy='most'), "remat_policy='most'")):
    model = models.build_model(_config(), NUM_CLASSES, **kw)
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


# ---------------------------------------------------------------------------------------------
# attention_impl


def test_fused_attention_gives_the_same_logits_loss_and_grads():
  cfg, x = _config(), _images()
  params, logits, loss, grads = _reference()
  fused = models.build_model(cfg, NUM_CLASSES, attention_impl='fused')
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_logits(fused, params, x), logits, **tol)
  loss_fused, grads_fused = _loss_and_grads(fused, params, x)
  np.testing.assert_allclose(loss_fused, loss, **tol)
  _assert_trees_close(grads_fused, grads, **tol)


def test_fused_attention_in_bfloat16_is_close_to_float32():
  cfg, x = _config(), _images()
  params, logits, _, _ = _reference()
  fused = models.build_model(cfg, NUM_CLASSES, dtype=jnp.bfloat16, attention_impl='fused')
  out = _logits(fused, params, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, logits, rtol=0.05, atol=0.1)
  assert not np.allclose(out, logits, atol=1e-6)  # It did compute in bfloat16.


def test_fused_attention_sows_nothing_and_refuses_attention_dropout():
  cfg, x = _config(), _images()
  params = _reference()[0]
  fused = models.build_model(cfg, NUM_CLASSES, attention_impl='fused')
  assert not jax.tree.leaves(_sown(fused, params, x))
  cfg.transformer.attention_dropout_rate = 0.1
  fused = models.build_model(cfg, NUM_CLASSES, attention_impl='fused')
  jax.eval_shape(lambda: fused.apply({'params': params}, x, train=False))  # Eval drops nothing.
  with pytest.raises(ValueError, match='no attention dropout'):
    jax.eval_shape(lambda: fused.apply({'params': params}, x, train=True,
                                       rngs={'dropout': jax.random.PRNGKey(0)}))


# ---------------------------------------------------------------------------------------------
# remat_policy


# Dropout (which doubles the compile time) once: it checks that remat keeps the rng paths.
@pytest.mark.parametrize('policy,dropout', [('full', 0.2), ('dots_saveable', 0.0),
                                            ('dots_with_no_batch_dims_saveable', 0.0)])
def test_remat_gives_the_same_loss_and_grads(policy, dropout):
  cfg, x = _config(dropout=dropout), _images()
  params, _, loss_plain, grads_plain = _reference(dropout)
  plain = models.build_model(cfg, NUM_CLASSES)
  remat = models.build_model(cfg, NUM_CLASSES, remat_policy=policy)
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(
      lambda: m.init(jax.random.PRNGKey(0), x, train=False)))
  assert shapes(remat) == shapes(plain)
  loss_remat, grads_remat = _loss_and_grads(remat, params, x)
  # Same dropout masks (same rng paths), so the same numbers up to float reassociation.
  np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
  _assert_trees_close(grads_remat, grads_plain, rtol=1e-5, atol=1e-6)
  # The attention weights are still sown through the remat.
  assert len(jax.tree.leaves(_sown(remat, params, x))) == cfg.transformer.num_layers


def _residual_bytes(model, params_shapes, batch: int) -> int:
  """Bytes the backward pass keeps from the forward pass: the leaves of the vjp closure."""

  def residuals(params, images):
    loss = lambda p: model.apply({'params': p}, images, train=False).sum()
    return jax.tree.leaves(jax.vjp(loss, params)[1])

  leaves = jax.eval_shape(residuals, params_shapes, jax.ShapeDtypeStruct(
      (batch, 32, 32, 3), jnp.float32))
  return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)


def _residual_bytes_per_image_and_layer(remat_policy: str, scan_layers: bool) -> float:
  """What one more image costs per extra encoder block: (layers 4 - layers 2) x (batch 6 - 2)."""
  per_image = []
  for layers in (2, 4):
    model = models.build_model(_config(num_layers=layers), NUM_CLASSES,
                               remat_policy=remat_policy, scan_layers=scan_layers)
    shapes = jax.eval_shape(
        lambda m=model: m.init(jax.random.PRNGKey(0), _images(1), train=False)['params'])
    per_image.append((_residual_bytes(model, shapes, 6) - _residual_bytes(model, shapes, 2)) / 4)
  return (per_image[1] - per_image[0]) / 2


@pytest.mark.parametrize('scan_layers', [False, True])
def test_full_remat_keeps_only_each_blocks_input(scan_layers):
  cfg = _config()
  tokens = (32 // cfg.patches.size[0]) ** 2 + 1  # 2x2 patches and the class token.
  block_input = tokens * cfg.hidden_size * 4  # float32
  assert _residual_bytes_per_image_and_layer('full', scan_layers) == block_input
  # Without remat a block keeps its LayerNorm, attention and MLP activations: 22x as much here.
  assert _residual_bytes_per_image_and_layer('none', scan_layers) > 10 * block_input


def test_scanned_remat_lowers_xla_temp_memory():
  """What XLA allocates, not just what JAX saves: with `scan_layers` the backward loop recomputes
  one block at a time (unrolled, XLA:CPU may schedule the recomputation early; see
  models.remat_caveat)."""
  images = jax.ShapeDtypeStruct((256, 32, 32, 3), jnp.float32)

  def temp_bytes(remat_policy):
    model = models.build_model(_config(num_layers=4), NUM_CLASSES, remat_policy=remat_policy,
                               scan_layers=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _images(1), train=False))
    grad = jax.jit(jax.grad(lambda p, x: model.apply(p, x, train=False).sum()))
    analysis = grad.lower(shapes, images).compile().memory_analysis()
    if analysis is None:
      pytest.skip(f'{jax.default_backend()} has no compiled.memory_analysis()')
    return analysis.temp_size_in_bytes

  # Saved activations per image: 41.5 kB without remat, 14.7 kB with (the residual test above).
  assert temp_bytes('full') < 0.7 * temp_bytes('none')


# ---------------------------------------------------------------------------------------------
# scan_layers


def test_scanned_model_with_stacked_params_matches_the_unscanned_model():
  cfg, x = _config(), _images()
  params, logits, loss_plain, grads_plain = _reference()
  scanned = models.build_model(cfg, NUM_CLASSES, scan_layers=True)
  stacked = models.stack_encoder_blocks(params)
  # The scanned model's own init has exactly the stacked layout.
  init = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x, train=False))['params']
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, stacked)
  assert init['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel'].shape == (
      2, 16, 32)
  np.testing.assert_allclose(_logits(scanned, stacked, x), logits, rtol=1e-5, atol=1e-5)
  loss_scan, grads_scan = _loss_and_grads(scanned, stacked, x)
  np.testing.assert_allclose(loss_scan, loss_plain, rtol=1e-5)
  _assert_trees_close(models.unstack_encoder_blocks(grads_scan), grads_plain,
                      rtol=1e-4, atol=1e-6)


def test_scanned_model_sows_stacked_attention_weights():
  cfg, x = _config(), _images()
  params = _reference()[0]
  scanned = models.build_model(cfg, NUM_CLASSES, scan_layers=True)
  state = _sown(scanned, models.stack_encoder_blocks(params), x)
  (weights,) = state['intermediates']['Transformer']['encoderblock'][
      'MultiHeadDotProductAttention_1']['attention_weights']
  assert weights.shape == (2, 2, 2, 5, 5)
  plain_state = _sown(models.build_model(cfg, NUM_CLASSES), params, x)
  for i in range(2):
    (expected,) = plain_state['intermediates']['Transformer'][f'encoderblock_{i}'][
        'MultiHeadDotProductAttention_1']['attention_weights']
    np.testing.assert_allclose(weights[i], expected, rtol=1e-5, atol=1e-6)


def test_scan_with_remat_and_fused_attention_matches_the_plain_model():
  cfg, x = _config(), _images()
  params, logits, loss, grads = _reference()
  model = models.build_model(cfg, NUM_CLASSES, scan_layers=True, remat_policy='full',
                             attention_impl='fused')
  stacked = models.stack_encoder_blocks(params)
  np.testing.assert_allclose(_logits(model, stacked, x), logits, rtol=1e-5, atol=1e-5)
  loss_all, grads_all = _loss_and_grads(model, stacked, x)
  np.testing.assert_allclose(loss_all, loss, rtol=1e-5)
  _assert_trees_close(models.unstack_encoder_blocks(grads_all), grads, rtol=1e-4, atol=1e-6)


def test_scanned_dropout_is_live_and_seeded():
  cfg, x = _config(dropout=0.2), _images()
  model = models.build_model(cfg, NUM_CLASSES, scan_layers=True, remat_policy='full')
  forward = jax.jit(lambda p, seed: model.apply(
      {'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(seed)}))
  params = models.stack_encoder_blocks(_reference()[0])
  np.testing.assert_array_equal(forward(params, 0), forward(params, 0))
  assert not np.allclose(forward(params, 0), forward(params, 1))
  assert not np.allclose(forward(params, 0), _reference()[1])


def test_stack_and_unstack_round_trip_exactly():
  cfg = _config()
  params = _params(cfg)
  stacked = models.stack_encoder_blocks(params)
  assert set(stacked['Transformer']) == {'encoderblock', 'posembed_input', 'encoder_norm'}
  assert stacked['head'] is params['head']
  back = models.unstack_encoder_blocks(stacked)
  flat, flat_back = (traverse_util.flatten_dict(t, sep='/') for t in (params, back))
  assert flat.keys() == flat_back.keys()
  for k in flat:
    assert flat_back[k].dtype == flat[k].dtype
    np.testing.assert_array_equal(flat_back[k], flat[k], err_msg=k)
  # jax.Arrays and abstract shapes (e.g. a trainer's abstract state) convert the same way.
  jax_stacked = models.stack_encoder_blocks(jax.tree.map(jnp.asarray, params))
  _assert_trees_close(jax_stacked, stacked, rtol=0, atol=0)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  assert (jax.tree.map(lambda s: s.shape, models.stack_encoder_blocks(abstract)) ==
          jax.tree.map(np.shape, stacked))
  assert (jax.tree.map(lambda s: s.shape, models.unstack_encoder_blocks(
      models.stack_encoder_blocks(abstract))) == jax.tree.map(np.shape, params))
  # Already in the target layout: unchanged.
  assert models.unstack_encoder_blocks(params).keys() == params.keys()
  assert models.unstack_encoder_blocks(params)['Transformer'] is params['Transformer']
  assert models.stack_encoder_blocks(stacked)['Transformer'] is stacked['Transformer']


def test_conversion_refuses_mixed_or_gapped_trees():
  params = _params(_config())
  mixed = models.stack_encoder_blocks(params)
  mixed['Transformer']['encoderblock_0'] = params['Transformer']['encoderblock_0']
  with pytest.raises(ValueError, match='both'):
    models.stack_encoder_blocks(mixed)
  with pytest.raises(ValueError, match='both'):
    models.unstack_encoder_blocks(mixed)
  gapped = dict(params, Transformer=dict(params['Transformer']))
  del gapped['Transformer']['encoderblock_0']
  with pytest.raises(ValueError, match='not numbered'):
    models.stack_encoder_blocks(gapped)


# ---------------------------------------------------------------------------------------------
# layout


def test_layout_resolves_per_backend_and_refuses_unknown_names():
  assert models.resolve_layout('auto', 'cpu') == 'flat'
  assert models.resolve_layout('auto', 'tpu') == 'tokens'
  assert models.resolve_layout('auto', 'gpu') == 'tokens'  # Not listed: the plain layout.
  assert models.resolve_layout('auto') == 'flat'  # The tests' backend is the CPU.
  assert models.resolve_layout('tokens', 'cpu') == 'tokens'
  with pytest.raises(ValueError, match="layout='rows'"):
    models.resolve_layout('rows')
  # The trainer lays the model out for its mesh's devices (vit_jax.plan compiles it for a TPU on
  # this CPU), unless the config names a layout.
  config = config_lib.base_config()
  config_lib.set_model(config, 'micro')
  config.pp.resolution, config.batch = 32, 8
  assert trainer_lib.Trainer(config, NUM_CLASSES).model.layout == 'flat'
  config.model.layout = 'tokens'
  assert trainer_lib.Trainer(config, NUM_CLASSES).model.layout == 'tokens'


def test_tokens_layout_gives_the_same_params_logits_loss_and_grads():
  cfg, x = _config(), _images()
  params, logits, loss, grads = _reference()  # The default on CPU: 'flat'.
  flat = models.build_model(cfg, NUM_CLASSES, layout='flat')
  tokens = models.build_model(cfg, NUM_CLASSES, layout='tokens')
  init = lambda m: jax.jit(lambda x: m.init(jax.random.PRNGKey(0), x, train=False))(x)
  _assert_trees_close(init(tokens), init(flat), rtol=0, atol=0)  # Bit for bit.
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_logits(tokens, params, x), logits, **tol)
  _assert_trees_close(_sown(tokens, params, x), _sown(flat, params, x), **tol)
  loss_tokens, grads_tokens = _loss_and_grads(tokens, params, x)
  np.testing.assert_allclose(loss_tokens, loss, **tol)
  _assert_trees_close(grads_tokens, grads, **tol)


def test_tokens_layout_attention_drops_the_same_weights_as_flat():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8))
  attention = {layout: models.MultiHeadDotProductAttention(2, 0.5, layout=layout)
               for layout in ('flat', 'tokens')}
  variables = jax.jit(lambda x: attention['flat'].init(
      jax.random.PRNGKey(0), x, deterministic=True))(x)

  def loss_and_grads(module):
    loss = lambda v: module.apply(v, x, deterministic=False,
                                  rngs={'dropout': jax.random.PRNGKey(4)}).sum()
    return jax.jit(jax.value_and_grad(loss))(variables)

  (loss_flat, grads_flat), (loss_tokens, grads_tokens) = map(loss_and_grads, attention.values())
  np.testing.assert_allclose(loss_tokens, loss_flat, rtol=1e-5)
  _assert_trees_close(grads_tokens, grads_flat, rtol=1e-5, atol=1e-6)
  no_dropout = jax.jit(lambda v: attention['tokens'].apply(v, x, deterministic=True).sum())(
      variables)
  assert abs(float(no_dropout) - float(loss_tokens)) > 1e-3  # Dropout did drop.


def test_tokens_layout_patch_embedding_drops_partial_patches_like_flat():
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 37, 45, 3))  # 2x2 patches of 16 + rest.
  embed = {layout: models.PatchEmbedding(8, (16, 16), layout=layout) for layout in
           ('flat', 'tokens')}
  variables = jax.jit(lambda x: embed['flat'].init(jax.random.PRNGKey(0), x))(x)
  out = {k: jax.jit(m.apply)(variables, x) for k, m in embed.items()}
  assert out['tokens'].shape == (2, 2, 2, 8)
  np.testing.assert_allclose(out['tokens'], out['flat'], rtol=1e-5, atol=1e-5)
  # Independent check of one patch: the kernel [16, 16, 3, 8] applied to rows 16:32, cols 0:16.
  kernel, bias = (np.asarray(variables['params'][k]) for k in ('kernel', 'bias'))
  patch = np.einsum('hwc,hwcd->d', np.asarray(x[1, 16:32, :16]), kernel) + bias
  np.testing.assert_allclose(out['tokens'][1, 1, 0], patch, rtol=1e-5, atol=1e-5)


def test_tokens_layout_in_bfloat16_keeps_attention_probabilities_in_bfloat16():
  cfg, x = _config(), _images()
  params, logits32, _, _ = _reference()
  flat, tokens = (models.build_model(cfg, NUM_CLASSES, dtype=jnp.bfloat16, layout=layout)
                  for layout in ('flat', 'tokens'))
  np.testing.assert_allclose(_logits(tokens, params, x), logits32, rtol=0.05, atol=0.1)
  loss_flat, grads_flat = _loss_and_grads(flat, params, x)
  loss_tokens, grads_tokens = _loss_and_grads(tokens, params, x)
  np.testing.assert_allclose(loss_tokens, loss_flat, rtol=0.02)
  _assert_trees_close(grads_tokens, grads_flat, rtol=0.1, atol=0.05)
  # What the backward pass keeps: flat keeps float32 exponentials [b, h, q, k] per block, tokens
  # the bfloat16 probabilities, 2 bytes less per element.
  shapes = jax.eval_shape(lambda: flat.init(jax.random.PRNGKey(0), _images(1), train=False))
  probs = cfg.transformer.num_heads * 5 * 5 * cfg.transformer.num_layers  # 2x2 patches + cls.
  saved = {m.layout: _residual_bytes(m, shapes['params'], 4) for m in (flat, tokens)}
  assert saved['flat'] - saved['tokens'] >= 4 * probs * 2


def test_softmax_keep_dtype_matches_numpy_forward_and_backward():
  logits = np.random.default_rng(0).normal(0, 2, (3, 4, 7)).astype(np.float32)
  cotangent = np.random.default_rng(1).normal(0, 1, logits.shape).astype(np.float32)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  dlogits = p * (cotangent - (cotangent * p).sum(-1, keepdims=True))
  out, vjp = jax.vjp(models.softmax_keep_dtype, logits)
  np.testing.assert_allclose(out, p, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(vjp(cotangent)[0], dlogits, rtol=1e-5, atol=1e-6)
  out16, vjp16 = jax.vjp(models.softmax_keep_dtype, logits.astype(jnp.bfloat16))
  grad16 = vjp16(cotangent.astype(jnp.bfloat16))[0]
  assert out16.dtype == grad16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), p, rtol=0.02, atol=0.01)
  np.testing.assert_allclose(np.asarray(grad16, np.float32), dlogits, rtol=0.05, atol=0.02)


def test_pallas_attention_in_interpret_mode_matches_einsum_attention():
  """Pallas' TPU flash attention, run by its interpreter on the CPU: 5 tokens padded to a block of
  128 (the padding masked as a segment of its own); logits, loss and gradients as 'xla'."""
  from jax.experimental.pallas import tpu as pltpu
  cfg = _config(num_layers=1)
  x = _images()
  params = _params(cfg)
  plain = models.build_model(cfg, NUM_CLASSES)
  pallas = models.build_model(cfg, NUM_CLASSES, attention_impl='pallas')
  with pltpu.force_tpu_interpret_mode():
    logits = _logits(pallas, params, x)
    loss, grads = _loss_and_grads(pallas, params, x)
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, _logits(plain, params, x), **tol)
  loss_plain, grads_plain = _loss_and_grads(plain, params, x)
  np.testing.assert_allclose(loss, loss_plain, **tol)
  _assert_trees_close(grads, grads_plain, **tol)

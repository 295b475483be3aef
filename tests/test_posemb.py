"""Position-embedding variants (`config.model.posemb`, appendix D.4 of the paper)."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import model_configs
from vit_jax import models


def _model(posemb, classifier='token'):
  cfg = model_configs.get_model_config('micro')
  cfg.posemb, cfg.classifier = posemb, classifier
  return models.build_model(cfg, 10)


def _init(model, x):
  return model.init(jax.random.PRNGKey(0), x, train=False)['params']


def _posemb_params(params):
  return {k: v.shape for k, v in traverse_util.flatten_dict(params, sep='/').items()
          if 'posembed' in k}


def test_default_is_the_released_1d_layout():
  assert all(c.posemb == 'learn' for c in model_configs.MODEL_CONFIGS.values()
             if c.transformer is not None)
  params = _init(_model('learn'), jnp.zeros((1, 32, 32, 3)))
  assert _posemb_params(params) == {'Transformer/posembed_input/pos_embedding': (1, 5, 16)}


@pytest.mark.parametrize('posemb,expected', [
    ('none', {}), ('sincos2d', {}),
    ('learn2d', {'Transformer/posembed_input/pos_embedding_row': (3, 8),
                 'Transformer/posembed_input/pos_embedding_col': (2, 8),
                 'Transformer/posembed_input/pos_embedding_cls': (1, 16)})])
def test_variant_parameters(posemb, expected):
  params = _init(_model(posemb), jnp.zeros((1, 48, 32, 3)))  # A 3 x 2 patch grid.
  assert _posemb_params(params) == expected


def test_learn2d_concatenates_row_and_column_embeddings():
  layer = models.AddPositionEmbs2D((3, 2))
  x = jnp.zeros((1, 1 + 6, 8))
  params = layer.init(jax.random.PRNGKey(0), x)['params']
  out = np.asarray(layer.apply({'params': params}, x))[0]
  row, col = np.asarray(params['pos_embedding_row']), np.asarray(params['pos_embedding_col'])
  np.testing.assert_array_equal(out[0], params['pos_embedding_cls'][0])
  for r in range(3):
    for c in range(2):
      np.testing.assert_array_equal(out[1 + 2 * r + c], np.concatenate([row[r], col[c]]))


def test_sincos2d_values():
  table = models.sincos2d((2, 3), 8)
  for r in range(2):
    for c in range(3):
      w = [1.0, 0.01]  # 10000 ** (-k / 2) for the 8 / 4 = 2 frequencies.
      expected = [np.sin(c * w[0]), np.sin(c * w[1]), np.cos(c * w[0]), np.cos(c * w[1]),
                  np.sin(r * w[0]), np.sin(r * w[1]), np.cos(r * w[0]), np.cos(r * w[1])]
      np.testing.assert_allclose(table[3 * r + c], expected, rtol=1e-6, atol=1e-7)


def _shuffle_patches(images, order, patch=16):
  n, h, w, c = images.shape
  g = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  g = g.reshape(n, -1, patch, patch, c)[:, order]
  g = g.reshape(n, h // patch, w // patch, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return g.reshape(images.shape)


@pytest.mark.parametrize('posemb,invariant', [('none', True), ('sincos2d', False),
                                              ('learn', False)])
def test_only_posemb_none_ignores_where_patches_are(posemb, invariant):
  model = _model(posemb, classifier='gap')
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  params = _init(model, x)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  apply = lambda images: np.asarray(model.apply({'params': params}, images, train=False))
  shuffled = apply(_shuffle_patches(x, [3, 1, 0, 2]))
  assert np.allclose(apply(x), shuffled, atol=1e-5) == invariant


def test_unknown_posemb_and_odd_sizes_are_clear_errors():
  with pytest.raises(ValueError, match="posemb='2d'; expected one of"):
    _init(_model('2d'), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='divisible by 4'):
    models.sincos2d((2, 2), 6)

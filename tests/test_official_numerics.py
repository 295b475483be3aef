"""Whole-model logits against a float64 numpy forward pass written from PAPER.md's formulas.

The released models use GELU's tanh approximation and weight standardisation
`(w - mean) / (std + 1e-5)`; a model computing either old formula (exact erf GELU,
`/ sqrt(var + 1e-5)`) misses the 1e-5 relative bound, which each test also checks.
"""
import jax
import numpy as np
from flax import traverse_util
import pytest
from scipy.special import erf

from tests.test_models import _np_encoder_block, _np_gelu, _np_layer_norm
from vit_jax import model_configs
from vit_jax import models

RELATIVE_TOLERANCE = 1e-5


def _np_exact_gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _np_std_weights(w):
  w = w - w.mean(axis=(0, 1, 2), keepdims=True)
  return w / (w.std(axis=(0, 1, 2), keepdims=True) + 1e-5)


def _np_var_weights(w):
  w = w - w.mean(axis=(0, 1, 2), keepdims=True)
  return w / np.sqrt(w.var(axis=(0, 1, 2), keepdims=True) + 1e-5)


def _same_padding(size, kernel, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _windows(x, kernel, stride, padding, value=0.0):
  """[B, H', W', C, kh, kw] patches of NHWC `x` ('SAME' or 'VALID' as in lax)."""
  kh, kw = kernel
  if padding == 'SAME':
    pads = [_same_padding(x.shape[1], kh, stride), _same_padding(x.shape[2], kw, stride)]
    x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)], constant_values=value)
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  return win[:, ::stride, ::stride]


def _np_conv(x, w, stride=1, padding='SAME'):
  return np.einsum('bhwcij,ijco->bhwo', _windows(x, w.shape[:2], stride, padding), w,
                   optimize=True)


def _np_group_norm(x, p, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p['scale'] + p['bias']


def _np_unit(x, p, stride, std):
  relu = lambda v: np.maximum(v, 0)
  conv = lambda v, name, s=1: _np_conv(v, std(p[name]['kernel']), s)
  residual = x
  if 'conv_proj' in p:
    residual = _np_group_norm(conv(x, 'conv_proj', stride), p['gn_proj'])
  y = relu(_np_group_norm(conv(x, 'conv1'), p['gn1']))
  y = relu(_np_group_norm(conv(y, 'conv2', stride), p['gn2']))
  y = _np_group_norm(conv(y, 'conv3'), p['gn3'])
  return relu(residual + y)


def _np_resnet(x, p, num_layers, std):
  x = np.maximum(_np_group_norm(_np_conv(x, std(p['conv_root']['kernel']), 2), p['gn_root']), 0)
  x = _windows(x, (3, 3), 2, 'SAME', value=-np.inf).max(axis=(-2, -1))
  for s, units in enumerate(num_layers):
    for u in range(units):
      stride = 2 if s > 0 and u == 0 else 1
      x = _np_unit(x, p[f'block{s + 1}'][f'unit{u + 1}'], stride, std)
  return x


def np_vit(images, p, cfg, *, gelu=_np_gelu, std=_np_std_weights):
  """Logits of a token-classifier ViT (hybrid when cfg.resnet is set), float64."""
  x = images.astype(np.float64)
  if cfg.resnet is not None:
    x = _np_resnet(x, p, cfg.resnet.num_layers, std)
  x = _np_conv(x, p['embedding']['kernel'], cfg.patches.size[0], 'VALID') + p['embedding']['bias']
  x = x.reshape(x.shape[0], -1, x.shape[-1])
  x = np.concatenate([np.broadcast_to(p['cls'], (x.shape[0], 1, x.shape[-1])), x], axis=1)
  t = p['Transformer']
  x = x + t['posembed_input']['pos_embedding']
  for i in range(cfg.transformer.num_layers):
    x, _ = _np_encoder_block(x, t[f'encoderblock_{i}'], gelu)
  x = _np_layer_norm(x, t['encoder_norm']['scale'], t['encoder_norm']['bias'])[:, 0]
  return x @ p['head']['kernel'] + p['head']['bias']


def _trained_scale_params(shapes, seed=0):
  """Random values of the shapes of the tree `shapes`; conv kernels at trained scale (x0.05), norms' scales near 1."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(shapes, sep='/')
  out = {}
  for key, value in sorted(flat.items()):
    noise = rng.normal(size=value.shape)
    if key.endswith('scale'):
      out[key] = 1 + 0.1 * noise
    elif key.endswith('kernel') and value.ndim == 4 and not key.startswith('embedding'):
      out[key] = 0.05 * noise
    else:
      out[key] = 0.3 * noise
  return traverse_util.unflatten_dict(out, sep='/')


def _relative_error(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize('resnet, patch', [(None, 4), ((1, 1), 1)])
def test_logits_match_the_official_formulas_and_not_the_old_ones(resnet, patch):
  cfg = model_configs.get_model_config('micro')
  cfg.patches.size = (patch, patch)
  if resnet is not None:
    cfg.resnet = {'num_layers': resnet, 'width_factor': 1}
  model = models.build_model(cfg, 10)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  params64 = _trained_scale_params(shapes['params'])
  params32 = jax.tree.map(lambda v: v.astype(np.float32), params64)
  logits = np.asarray(model.apply({'params': params32}, images, train=False), np.float64)
  want = np_vit(images, params64, cfg)
  assert _relative_error(logits, want) < RELATIVE_TOLERANCE
  old_formulas = [np_vit(images, params64, cfg, gelu=_np_exact_gelu)]
  if resnet is not None:
    old_formulas.append(np_vit(images, params64, cfg, std=_np_var_weights))
  for old in old_formulas:
    assert _relative_error(old, want) > 10 * RELATIVE_TOLERANCE

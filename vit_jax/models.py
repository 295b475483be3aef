"""Vision Transformer, ResNet+ViT hybrid and ResNet alone (BiT baseline) as Flax Linen modules.

Modules are named explicitly so that the parameter tree is the released `.npz` layout, name for
name and shape for shape (pre-Linen `LayerNorm_0`, `MultiHeadDotProductAttention_1`, ... inside
each encoder block): `vit_jax.checkpoint` only (un)flattens keys. Attention probabilities are sown
into `intermediates` as `attention_weights` [batch, heads, queries, keys] (apply with
`mutable=['intermediates']`). The speed switches `attention_impl`, `remat_policy`, `scan_layers`
and `layout` change speed and memory, never the function (docs/PERFORMANCE.md, "The switches");
with `scan_layers` the blocks are held stacked (`stack_encoder_blocks`). Activations name their
batch axis `BATCH` for the training program's sharding (docs/ARCHITECTURE.md, "Sharding").
"""
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import model_configs
from vit_jax.model_configs import MODEL_CONFIGS  # re-exported: `vit_jax.models.MODEL_CONFIGS`

Dtype = Any

_XAVIER = nn.initializers.xavier_uniform()
_MLP_BIAS = nn.initializers.normal(stddev=1e-6)

ATTENTION_IMPLS = ('xla', 'fused', 'pallas')
# How the matmuls lay out their operands (same function, same parameters): 'flat' 2-D matmuls
# over flattened tokens, attention heads-first (fastest on XLA:CPU); 'tokens' dot_generals on
# [batch, tokens, ...] as they come (on XLA:TPU flattening costs relayout copies: docs/
# PERFORMANCE.md, "TPU, by the compiler"); 'auto' the backend's entry of BACKEND_LAYOUTS.
LAYOUTS = ('auto', 'flat', 'tokens')
BACKEND_LAYOUTS = {'cpu': 'flat', 'tpu': 'tokens'}
# Compute dtypes (`dtype=jnp.dtype(name)`); parameters stay float32.
DTYPES = ('float32', 'bfloat16')
# The logical name of the activations' batch axis (nn.with_logical_constraint; a no-op outside
# nn.logical_axis_rules, so the model knows no mesh).
BATCH = 'batch'
# Name of the stacked encoder block under `Transformer` with scan_layers=True.
SCANNED_BLOCK = 'encoderblock'
# remat_policy name -> jax.checkpoint policy ('none': no rematerialisation at all).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_layout(layout: str, platform: Optional[str] = None) -> str:
  """`layout` (one of LAYOUTS) -> 'flat' or 'tokens' on `platform` (default: the default
  backend's); programs compiled ahead of time for other devices pass their devices' platform."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r}; expected one of {LAYOUTS}.')
  if layout != 'auto':
    return layout
  return BACKEND_LAYOUTS.get(platform or jax.default_backend(), 'tokens')


def remat_caveat(backend: str, remat_policy: str, scan_layers: bool) -> Optional[str]:
  """Why `remat_policy` saves no memory on `backend` with this layout, or None: XLA:CPU schedules
  the recomputation of unrolled remat blocks early, so their activations are alive together;
  only scan's backward loop recomputes each block when it is reached (docs/PERFORMANCE.md,
  "Rematerialisation needs scan on XLA:CPU")."""
  if backend == 'cpu' and remat_policy != 'none' and not scan_layers:
    return 'remat without scan_layers saves no memory on XLA:CPU (it recomputes early)'
  return None


def check_remat_layout(model_config) -> bool:
  """Warns when a run's remat would save no memory on this backend (see `remat_caveat`)."""
  caveat = remat_caveat(jax.default_backend(), model_config.get('remat_policy', 'none'),
                        model_config.get('scan_layers', False))
  if caveat:
    logging.warning('%s: set config.model.scan_layers=True too.', caveat)
  return caveat is None


def _constrain_batch(x):
  """Pins [batch, tokens, hidden] activations to the `BATCH` layout, where rules map it."""
  return nn.with_logical_constraint(x, (BATCH, None, None))


def abstract_params(model_config: ml_collections.ConfigDict, num_classes: Optional[int],
                    resolution: int, **overrides):
  """The parameter tree of `build_model(model_config, num_classes, **overrides)` at
  `resolution`, as jax.ShapeDtypeStructs (nothing is allocated)."""
  model = build_model(model_config, num_classes, **overrides)
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)['params']


class StdConv(nn.Conv):
  """Convolution with weight standardisation over the kernel's spatial and input axes (BiT):
  `(w - mean) / (std + 1e-5)`, the released hybrids' formula (not `/ sqrt(var + 1e-5)`)."""

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      param = param - jnp.mean(param, axis=(0, 1, 2), keepdims=True)
      param = param / (jnp.std(param, axis=(0, 1, 2), keepdims=True) + 1e-5)
    return param


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 with 4x expansion, post-activation."""
  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: StdConv(
        f, k, s, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    norm = lambda name, **kw: nn.GroupNorm(
        dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(residual)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = conv(self.features * 4, (1, 1), (1, 1), 'conv3')(y)
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; the first one carries the stride and the projection."""
  num_units: int
  features: int
  first_strides: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_units):
      x = ResidualUnit(self.features, self.first_strides if i == 0 else (1, 1),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=f'unit{i + 1}')(x)
    return x


def resnet_stem(x, *, num_layers: Sequence[int], width_factor: int, dtype, param_dtype):
  """BiT ResNet root and stages. Called inside `VisionTransformer`'s compact scope so that the
  parameters sit at the top level (`conv_root`, `gn_root`, `block1/unit1/...`) as released."""
  width = int(64 * width_factor)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  x = StdConv(width, (7, 7), (2, 2), use_bias=False, name='conv_root', **kw)(x)
  x = nn.relu(nn.GroupNorm(name='gn_root', **kw)(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i, units in enumerate(num_layers):
    x = ResNetStage(units, width * 2**i, (1, 1) if i == 0 else (2, 2), name=f'block{i + 1}',
                    **kw)(x)
  return x


def token_matmul(module: nn.Module, x, features: Tuple[int, ...], in_axes: int,
                 kernel_init: Callable, bias_init: Callable, layout: str = 'flat'):
  """x's last `in_axes` axes times `module`'s `kernel` [*in, *features], plus its `bias`
  [*features], both created on `module`; the initialisers see the flat [in, out] and [out]
  shapes, so a fresh init is `nn.DenseGeneral`'s (`nn.Conv`'s for the patch embedding) bit for
  bit. layout 'flat': one 2-D matmul over the leading axes flattened (docs/PERFORMANCE.md, "Dense
  layers as 2-D matmuls"); 'tokens': one dot_general on x as it is."""
  lead, in_shape = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:]
  n_in, n_out = math.prod(in_shape), math.prod(features)
  flat = lambda init, shape: lambda rng, full, dtype: init(rng, shape, dtype).reshape(full)
  kernel = module.param('kernel', flat(kernel_init, (n_in, n_out)), (*in_shape, *features),
                        module.param_dtype)
  bias = module.param('bias', flat(bias_init, (n_out,)), tuple(features), module.param_dtype)
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)
  if layout == 'tokens':
    contract = (tuple(range(len(lead), x.ndim)), tuple(range(in_axes)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias
  y = x.reshape(-1, n_in) @ kernel.reshape(n_in, n_out) + bias.reshape(n_out)
  return y.reshape(*lead, *features)


class TokenDense(nn.Module):
  """`nn.DenseGeneral` over each token's last `in_axes` axes, computed by `token_matmul`."""
  features: Tuple[int, ...]
  in_axes: int = 1
  kernel_init: Callable = _XAVIER
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  layout: str = 'flat'  # 'flat' or 'tokens' (LAYOUTS, resolved).

  @nn.compact
  def __call__(self, x):
    return token_matmul(self, x, tuple(self.features), self.in_axes, self.kernel_init,
                        self.bias_init, self.layout)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the released parameter layout (per-head projections in `TokenDense`s)."""
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  layout: str = 'flat'  # 'flat' or 'tokens' (LAYOUTS, resolved).

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r}; expected one of '
                       f'{ATTENTION_IMPLS}.')
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'hidden_size {features} is not divisible by num_heads {self.num_heads}.')
    head_dim = features // self.num_heads
    dense = lambda name, features, in_axes=1: TokenDense(
        features, in_axes, dtype=self.dtype, param_dtype=self.param_dtype, layout=self.layout,
        name=name)
    query, key, value = (dense(name, (self.num_heads, head_dim))(x)
                         for name in ('query', 'key', 'value'))
    if self.attention_impl in ('fused', 'pallas'):
      if self.dropout_rate and not deterministic:
        raise ValueError(f'attention_impl={self.attention_impl!r} has no attention dropout; use '
                         f"'xla' to train with attention_dropout_rate={self.dropout_rate}.")
      impl = fused_attention if self.attention_impl == 'fused' else pallas_attention
      out = impl(query, key, value)
    elif self.layout == 'tokens':
      out = tokens_attention(self, query, key, value, deterministic=deterministic)
    else:
      out = einsum_attention(self, query, key, value, deterministic=deterministic)
    return dense('out', (features,), in_axes=2)(out)


def einsum_attention(module: nn.Module, query, key, value, *, deterministic: bool):
  """softmax(q k^T / sqrt(d)) v spelled out; [batch, tokens, heads, d] in and out.

  The query is scaled before q.k, as Flax's `dot_product_attention` (the released models). Heads
  go in front of the tokens, and the softmax's division is deferred to the [b, h, q, d] output
  (dropout commutes with it): both faster on XLA:CPU (docs/PERFORMANCE.md, "Attention, heads
  first"). The normalised weights are sown for analysis.
  """
  query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (query, key, value))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  total = unnormalised.sum(-1, keepdims=True)
  module.sow('intermediates', 'attention_weights', unnormalised / total)
  unnormalised = nn.Dropout(module.dropout_rate)(unnormalised, deterministic=deterministic)
  out = jnp.einsum('bhqk,bhkd->bhqd', unnormalised.astype(query.dtype), v)
  return (out / total.astype(out.dtype)).transpose(0, 2, 1, 3)


@jax.custom_vjp
def softmax_keep_dtype(logits):
  """softmax over the last axis, computed in float32 and returned in `logits`' dtype; its backward
  pass keeps only that output (jax.nn.softmax of an upcast would keep a float32 copy)."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def _softmax_keep_dtype_fwd(logits):
  probs = softmax_keep_dtype(logits)
  return probs, probs


def _softmax_keep_dtype_bwd(probs, grad):
  p, g = probs.astype(jnp.float32), grad.astype(jnp.float32)
  return ((p * (g - jnp.sum(g * p, axis=-1, keepdims=True))).astype(probs.dtype),)


softmax_keep_dtype.defvjp(_softmax_keep_dtype_fwd, _softmax_keep_dtype_bwd)


def tokens_attention(module: nn.Module, query, key, value, *, deterministic: bool):
  """softmax(q k^T / sqrt(d)) v on [batch, tokens, heads, d] operands as they come (layout
  'tokens'): no transposes; the logits and probabilities [b, h, q, k] in the compute dtype (the
  softmax itself in float32, `softmax_keep_dtype`), the probabilities sown for analysis."""
  query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
  weights = softmax_keep_dtype(jnp.einsum('bqhd,bkhd->bhqk', query, key))
  module.sow('intermediates', 'attention_weights', weights)
  weights = nn.Dropout(module.dropout_rate)(weights, deterministic=deterministic)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, value)


def fused_attention(query, key, value):
  """softmax(q k^T / sqrt(d)) v with `jax.nn.dot_product_attention`; [batch, tokens, heads, d].
  On a CUDA GPU with bf16/fp16 inputs it asks for cuDNN (`implementation=None` means XLA in this
  JAX version), falling back to XLA where cuDNN refuses at trace time."""
  if (jax.default_backend() == 'gpu' and query.dtype in (jnp.bfloat16, jnp.float16)):
    try:
      return jax.nn.dot_product_attention(query, key, value, implementation='cudnn')
    except (NotImplementedError, RuntimeError, ValueError, TypeError):
      pass
  return jax.nn.dot_product_attention(query, key, value, implementation=None)


# Pallas' TPU flash attention tiles the tokens in blocks of this many (its minimum block size).
PALLAS_BLOCK = 128


def pallas_attention(query, key, value):
  """softmax(q k^T / sqrt(d)) v with Pallas' TPU flash attention; [batch, tokens, heads, d].

  The kernel never writes the [b, h, q, k] logits or probabilities to memory. The tokens are
  padded to a multiple of PALLAS_BLOCK, the padding in a segment of its own that no real token
  attends to. TPU only (on the CPU under `force_tpu_interpret_mode()`). XLA cannot partition the
  kernel: over a mesh (`BATCH` mapped by the logical axis rules) it runs per device (`shard_map`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  spec = nn.logical_to_mesh_axes((BATCH, None, None, None))
  if mesh.empty or spec is None:
    return _pallas_attention(query, key, value)
  return jax.shard_map(_pallas_attention, mesh=mesh, in_specs=spec, out_specs=spec,
                       check_vma=False)(query, key, value)


def _pallas_attention(query, key, value):
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # TPU-only.
  batch, tokens, _, head_dim = query.shape
  padded = -(-tokens // PALLAS_BLOCK) * PALLAS_BLOCK
  q, k, v = (jnp.pad(t, ((0, 0), (0, padded - tokens), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
             for t in (query, key, value))
  segment = jnp.broadcast_to((jnp.arange(padded) >= tokens).astype(jnp.int32), (batch, padded))
  out = pallas_flash.flash_attention(
      q, k, v, segment_ids=pallas_flash.SegmentIds(segment, segment),
      sm_scale=1.0 / math.sqrt(head_dim))
  return out.transpose(0, 2, 1, 3)[:, :tokens]


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense. GELU is the tanh approximation, as in the released models."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  layout: str = 'flat'  # 'flat' or 'tokens' (LAYOUTS, resolved).

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = lambda f, name: TokenDense((f,), bias_init=_MLP_BIAS, dtype=self.dtype,
                                       param_dtype=self.param_dtype, layout=self.layout,
                                       name=name)
    features = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x), approximate=True)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(features, 'Dense_1')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  layout: str = 'flat'  # 'flat' or 'tokens' (LAYOUTS, resolved).

  @nn.compact
  def __call__(self, x, deterministic: bool):
    # `deterministic` may be passed positionally: `nn.remat` needs it as a static positional.
    x = _constrain_batch(x)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, layout=self.layout)
    y = nn.LayerNorm(name='LayerNorm_0', dtype=self.dtype, param_dtype=self.param_dtype)(x)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, name='MultiHeadDotProductAttention_1',
        attention_impl=self.attention_impl, **kw)(y, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(name='LayerNorm_2', dtype=self.dtype, param_dtype=self.param_dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, name='MlpBlock_3', **kw)(
        y, deterministic=deterministic)
    return x + y


class _ScannedEncoder1DBlock(Encoder1DBlock):
  """The same block as an `nn.scan` body: returns (carry, per-layer output)."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    return super().__call__(x, deterministic), None


class AddPositionEmbs(nn.Module):
  """Learned 1-D position embeddings, shape (1, tokens, hidden)."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                               (1,) + x.shape[1:], self.param_dtype)
    return x + pos_embedding.astype(x.dtype)


class AddPositionEmbs2D(nn.Module):
  """Learned 2-D position embeddings (appendix D.4): a row and a column embedding of D/2 each,
  concatenated per patch; the class token (if any) has an embedding of its own."""
  grid: Tuple[int, int]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    (rows, cols), dim = self.grid, x.shape[-1]
    if dim % 2:
      raise ValueError(f"posemb='learn2d' needs an even hidden size, not {dim}.")
    init = nn.initializers.normal(stddev=0.02)
    row = self.param('pos_embedding_row', init, (rows, dim // 2), self.param_dtype)
    col = self.param('pos_embedding_col', init, (cols, dim // 2), self.param_dtype)
    patches = jnp.concatenate([jnp.repeat(row, cols, axis=0), jnp.tile(col, (rows, 1))], -1)
    prefix = x.shape[1] - rows * cols
    if prefix:
      patches = jnp.concatenate(
          [self.param('pos_embedding_cls', init, (prefix, dim), self.param_dtype), patches])
    return x + patches[None].astype(x.dtype)


def sincos2d(grid: Sequence[int], dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """[rows * cols, dim] fixed 2-D sine-cosine embeddings, patches row-major: per patch
  [sin(c w), cos(c w), sin(r w), cos(r w)] for column c, row r and the dim/4 frequencies
  w_k = temperature^(-k / (dim / 4))."""
  if dim % 4:
    raise ValueError(f"posemb='sincos2d' needs a hidden size divisible by 4, not {dim}.")
  omega = temperature ** (-np.arange(dim // 4) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  r, c = (np.outer(a.ravel(), omega) for a in (rows, cols))
  return np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1).astype(np.float32)


# config.model.posemb (appendix D.4): 'learn' (the released `posembed_input/pos_embedding`),
# 'none', 'learn2d' (AddPositionEmbs2D) or 'sincos2d' (fixed; zero for the class token).
POSEMB_TYPES = ('learn', 'none', 'learn2d', 'sincos2d')


def add_position_embeddings(x, posemb: str, grid: Tuple[int, int], param_dtype):
  """Adds the `posemb` position embeddings to tokens [batch, prefix + rows * cols, D]. Called in
  `Encoder`'s compact scope: the parameters live under `Transformer/posembed_input`."""
  if posemb == 'learn':
    return AddPositionEmbs(param_dtype, name='posembed_input')(x)
  if posemb == 'learn2d':
    return AddPositionEmbs2D(tuple(grid), param_dtype, name='posembed_input')(x)
  if posemb == 'sincos2d':
    table = sincos2d(grid, x.shape[-1])
    table = np.concatenate([np.zeros((x.shape[1] - len(table), x.shape[-1]), np.float32), table])
    return x + jnp.asarray(table, x.dtype)[None]
  if posemb == 'none':
    return x
  raise ValueError(f'posemb={posemb!r}; expected one of {POSEMB_TYPES}.')


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  remat_policy: str = 'none'
  scan_layers: bool = False
  posemb: str = 'learn'
  grid: Tuple[int, int] = (0, 0)  # Patches per side; needed by the 2-D position embeddings.
  layout: str = 'flat'  # 'flat' or 'tokens' (LAYOUTS, resolved).

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy={self.remat_policy!r}; expected one of '
                       f'{tuple(REMAT_POLICIES)}.')
    deterministic = not train
    x = add_position_embeddings(x, self.posemb, self.grid, self.param_dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    fields = ('mlp_dim', 'num_heads', 'dropout_rate', 'attention_dropout_rate', 'dtype',
              'param_dtype', 'attention_impl', 'layout')
    block_kw = {f: getattr(self, f) for f in fields}
    block = _ScannedEncoder1DBlock if self.scan_layers else Encoder1DBlock
    if self.remat_policy != 'none':
      # static_argnums counts `self`: 2 is `deterministic`. Inside a scan, CSE cannot undo the
      # rematerialisation, so its prevention (which costs speed) is unnecessary.
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(2,),
                       prevent_cse=not self.scan_layers)
    if self.scan_layers:
      block = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0},
                      split_rngs={'params': True, 'dropout': True}, in_axes=nn.broadcast,
                      length=self.num_layers)
      x, _ = block(name=SCANNED_BLOCK, **block_kw)(x, deterministic)
    else:
      for i in range(self.num_layers):
        x = block(name=f'encoderblock_{i}', **block_kw)(x, deterministic)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='encoder_norm')(x)


class PatchEmbedding(nn.Module):
  """The `embedding` layer: the released `patch_size` convolution with stride `patch_size`,
  'VALID' padding (kernel [ph, pw, C, D], bias [D], `nn.Conv`'s init), computed as `token_matmul`
  over the patches: faster on XLA:CPU, fewer bytes on XLA:TPU (docs/PERFORMANCE.md, "Patch
  embedding as a matmul"). Rows and columns beyond the last whole patch are dropped."""
  features: int
  patch_size: Tuple[int, int]
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  layout: str = 'flat'  # 'flat' or 'tokens' (LAYOUTS, resolved).

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    ph, pw = self.patch_size
    rows, cols = height // ph, width // pw
    patches = x[:, :rows * ph, :cols * pw].reshape(batch, rows, ph, cols, pw, channels)
    return token_matmul(self, patches.transpose(0, 1, 3, 2, 4, 5), (self.features,), 3,
                        nn.initializers.lecun_normal(), nn.initializers.zeros, self.layout)


class VisionTransformer(nn.Module):
  """ViT; the ResNet+ViT hybrid when `resnet` is set; the ResNet alone when `transformer` is None.

  Images NHWC in [-1, 1]. Without a transformer (the official `transformer=None`, the paper's BiT
  baseline) the ResNet's feature map (through the `embedding` conv when `hidden_size` is set) is
  averaged over space (`classifier` must be 'gap') and fed to the head.
  """
  num_classes: Optional[int]
  patches: Any
  hidden_size: Optional[int]
  transformer: Any
  classifier: str = 'token'
  representation_size: Optional[int] = None
  resnet: Optional[Any] = None
  model_name: Optional[str] = None
  head_bias_init: float = 0.0
  posemb: str = 'learn'  # One of POSEMB_TYPES.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # Speed switches; see the module docstring.
  attention_impl: str = 'xla'
  remat_policy: str = 'none'
  scan_layers: bool = False
  layout: str = 'auto'  # One of LAYOUTS; 'auto' resolves by the default backend.

  @nn.compact
  def __call__(self, images, *, train: bool):
    if self.classifier not in model_configs.CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; expected one of '
                       f'{tuple(model_configs.CLASSIFIERS)}.')
    if self.transformer is None and self.classifier != 'gap':
      raise ValueError(f"A model without a transformer ({self.model_name}) pools its feature "
                       f"map: classifier must be 'gap', not {self.classifier!r}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    if self.resnet is not None:
      x = resnet_stem(x, num_layers=tuple(self.resnet['num_layers']),
                      width_factor=self.resnet['width_factor'], **kw)
    if self.hidden_size is not None:
      x = PatchEmbedding(self.hidden_size, tuple(self.patches['size']), name='embedding',
                         layout=resolve_layout(self.layout), **kw)(x)
    if self.transformer is not None:
      x = self._encode(x, train=train)
    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))  # Tokens, or a ResNet's height and width.
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, name='pre_logits', **kw)(x))
    if not self.num_classes:
      return x
    head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.constant(self.head_bias_init), name='head', **kw)
    return head(x).astype(jnp.float32)

  def _encode(self, x, *, train: bool):
    """Patch grid [batch, h, w, D] -> (class token +) tokens through the `Transformer` encoder."""
    batch, height, width, channels = x.shape
    fields = ('num_layers', 'mlp_dim', 'num_heads', 'dropout_rate', 'attention_dropout_rate')
    x = _constrain_batch(jnp.reshape(x, (batch, height * width, channels)))
    if model_configs.CLASSIFIERS[self.classifier][0]:  # A class token.
      cls = self.param('cls', nn.initializers.zeros, (1, 1, channels), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
    return Encoder(name='Transformer', attention_impl=self.attention_impl,
                   remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                   posemb=self.posemb, layout=resolve_layout(self.layout),
                   grid=(height, width), dtype=self.dtype, param_dtype=self.param_dtype,
                   **{k: self.transformer[k] for k in fields})(x, train=train)


def build_model(model_config: ml_collections.ConfigDict, num_classes: Optional[int],
                **overrides) -> VisionTransformer:
  """`VisionTransformer(num_classes=..., **model_config)` with module-field overrides
  (e.g. `dtype=jnp.bfloat16`). Nested fields may be ConfigDicts or plain dicts."""
  return VisionTransformer(num_classes=num_classes, **{**dict(model_config), **overrides})


# ---------------------------------------------------------------------------------------------
# The scan_layers parameter layout <-> the released layout.

_BLOCK_NAME = re.compile(r'^encoderblock_(\d+)$')


def stack_encoder_blocks(params: Mapping[str, Any]) -> dict:
  """Released layout -> `scan_layers=True` layout: `Transformer/encoderblock_0 .. _{L-1}`
  become one `Transformer/encoderblock` whose leaves have a leading layer axis of size L. Leaves
  may be arrays or `jax.ShapeDtypeStruct`s (their sharding dropped); a tree without numbered
  blocks (already stacked, or no transformer) is returned unchanged."""
  transformer = params.get('Transformer', {})
  numbered = {int(m.group(1)): name for name in transformer
              if (m := _BLOCK_NAME.match(name))}
  if not numbered:
    return dict(params)
  if SCANNED_BLOCK in transformer:
    raise ValueError('Transformer has both a stacked `encoderblock` and numbered '
                     f'encoder blocks {sorted(numbered)}.')
  if sorted(numbered) != list(range(len(numbered))):
    raise ValueError(f'Encoder blocks {sorted(numbered)} are not numbered 0..L-1.')
  blocks = [transformer[numbered[i]] for i in range(len(numbered))]
  try:
    stacked = jax.tree.map(lambda *leaves: _stack(leaves), *blocks)
  except ValueError as e:
    raise ValueError(f'Encoder blocks differ in structure: {e}') from e
  rest = {k: v for k, v in transformer.items() if not _BLOCK_NAME.match(k)}
  return {**params, 'Transformer': {**rest, SCANNED_BLOCK: stacked}}


def unstack_encoder_blocks(params: Mapping[str, Any]) -> dict:
  """`scan_layers=True` layout -> released layout (the inverse of `stack_encoder_blocks`); a
  tree without a stacked `Transformer/encoderblock` is returned unchanged."""
  transformer = params.get('Transformer', {})
  if SCANNED_BLOCK not in transformer:
    return dict(params)
  if any(_BLOCK_NAME.match(name) for name in transformer):
    raise ValueError('Transformer has both a stacked `encoderblock` and numbered encoder '
                     'blocks.')
  stacked = transformer[SCANNED_BLOCK]
  lengths = {leaf.shape[0] if leaf.shape else None for leaf in jax.tree.leaves(stacked)}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(f'The stacked encoder block leaves disagree on the layer axis: {lengths}.')
  (num_layers,) = lengths
  rest = {k: v for k, v in transformer.items() if k != SCANNED_BLOCK}
  for i in range(num_layers):
    rest[f'encoderblock_{i}'] = jax.tree.map(lambda leaf, i=i: _index(leaf, i), stacked)
  return {**params, 'Transformer': rest}


def _stack(leaves):
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _index(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  return leaf[i]

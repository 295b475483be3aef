"""Model configurations, keyed by the names of the released checkpoints.

Each entry is an `ml_collections.ConfigDict` whose fields are the keyword arguments of
`vit_jax.models.VisionTransformer` (besides `num_classes`).
"""
import math
from typing import Optional, Sequence

import ml_collections

_SIZES = {
    # name: (hidden_size, mlp_dim, num_heads, num_layers)
    'Ti': (192, 768, 3, 12),
    'S': (384, 1536, 6, 12),
    'B': (768, 3072, 12, 12),
    'L': (1024, 4096, 16, 24),
    'H': (1280, 5120, 16, 32),
}


# Module fields that change speed and memory, never the function computed (see vit_jax.models):
# their plain-model defaults, carried by every config from `get_model_config` so that a run can
# set them (`--config.model.scan_layers=True`).
SPEED_SWITCHES = {'attention_impl': 'xla', 'remat_policy': 'none', 'scan_layers': False,
                  'layout': 'auto'}


def _vit(name: str, size: str, patch: int, *, dropout: float = 0.0,
         classifier: str = 'token', representation_size: Optional[int] = None,
         resnet: Optional[Sequence[int]] = None) -> ml_collections.ConfigDict:
  hidden, mlp, heads, layers = _SIZES[size]
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.patches = ml_collections.ConfigDict({'size': (patch, patch)})
  config.hidden_size = hidden
  config.transformer = ml_collections.ConfigDict({
      'mlp_dim': mlp,
      'num_heads': heads,
      'num_layers': layers,
      'attention_dropout_rate': 0.0,
      'dropout_rate': dropout,
  })
  config.classifier = classifier
  config.representation_size = representation_size
  config.posemb = 'learn'  # vit_jax.models.POSEMB_TYPES
  config.resnet = None if resnet is None else _resnet(resnet)
  return config


def _resnet(num_layers: Sequence[int], width_factor: float = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'num_layers': tuple(num_layers),
                                    'width_factor': width_factor})


def bit(name: str, num_layers: Sequence[int],
        width_factor: float = 1) -> ml_collections.ConfigDict:
  """The ResNet alone (the official `VisionTransformer(transformer=None)`, the paper's BiT
  baseline): BiT root and stages of the hybrids' bottleneck units, global average pooling over
  the feature map, head. No patch embedding (`hidden_size` None), no transformer."""
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.patches = None
  config.hidden_size = None
  config.transformer = None
  config.classifier = 'gap'
  config.representation_size = None
  config.resnet = _resnet(num_layers, width_factor)
  config.update(SPEED_SWITCHES)
  return config


def _small(name: str, hidden: int, mlp: int, layers: int, *, dropout: float = 0.0,
           classifier: str = 'token') -> ml_collections.ConfigDict:
  config = _vit(name, 'Ti', 16, dropout=dropout, classifier=classifier)
  config.hidden_size = hidden
  config.transformer.update(mlp_dim=mlp, num_heads=2, num_layers=layers)
  return config


# The official repository's `testing` (21,390 parameters at 1,000 classes and 224px) and
# `testing-unpooled` (its head classifies each of the 196 patch tokens: no class token).
_TESTING = dict(hidden=10, mlp=10, layers=1, dropout=0.1)


def _all_configs():
  configs = [
      _vit('ViT-Ti_16', 'Ti', 16),
      _vit('ViT-S_16', 'S', 16),
      _vit('ViT-S_32', 'S', 32),
      _vit('ViT-B_8', 'B', 8),
      _vit('ViT-B_16', 'B', 16),
      _vit('ViT-B_32', 'B', 32),
      _vit('ViT-L_16', 'L', 16, dropout=0.1),
      _vit('ViT-L_32', 'L', 32),
      _vit('ViT-H_14', 'H', 14, dropout=0.1),
      _vit('ViT-S_16-gap-norep', 'S', 16, classifier='gap'),
      _vit('ViT-B_16-gap-norep', 'B', 16, classifier='gap'),
      _vit('ViT-S_32-gap-norep', 'S', 32, classifier='gap'),
      _vit('ViT-B_32-gap-norep', 'B', 32, classifier='gap'),
      # Hybrids: the ResNet stem reduces the image, the transformer sees 1x1 "patches".
      _vit('R+ViT-Ti_16', 'Ti', 8, resnet=()),
      _vit('R26+ViT-S_32', 'S', 1, resnet=(2, 2, 2, 2)),
      _vit('R26+ViT-B_32', 'B', 1, resnet=(2, 2, 2, 2)),
      _vit('R50+ViT-B_16', 'B', 1, dropout=0.1, resnet=(3, 4, 9)),
      _vit('R50+ViT-L_32', 'L', 1, resnet=(3, 4, 6, 3)),
      bit('BiT-R26x1', (2, 2, 2, 2)),
      bit('BiT-R50x1', (3, 4, 6, 3)),
      bit('BiT-R101x1', (3, 4, 23, 3)),
      bit('BiT-R152x4', (3, 8, 36, 3), width_factor=4),  # BiT-L (Table 2).
      _small('testing', **_TESTING),
      _small('testing-unpooled', **_TESTING, classifier='unpooled'),
      # The tests' and the demo's model: small, but with even widths (2-D position embeddings).
      _small('micro', hidden=16, mlp=32, layers=2),
  ]
  return {c.model_name: c for c in configs}


MODEL_CONFIGS = _all_configs()

# Short names accepted on the command line, e.g. `configs/vit.py:b16,cifar10`.
ALIASES = {
    'ti16': 'ViT-Ti_16', 's16': 'ViT-S_16', 's32': 'ViT-S_32', 'b8': 'ViT-B_8',
    'b16': 'ViT-B_16', 'b32': 'ViT-B_32', 'l16': 'ViT-L_16', 'l32': 'ViT-L_32',
    'h14': 'ViT-H_14', 's16gap': 'ViT-S_16-gap-norep', 'b16gap': 'ViT-B_16-gap-norep',
    's32gap': 'ViT-S_32-gap-norep', 'b32gap': 'ViT-B_32-gap-norep',
    'rti16': 'R+ViT-Ti_16', 'r26s32': 'R26+ViT-S_32', 'r26b32': 'R26+ViT-B_32',
    'r50b16': 'R50+ViT-B_16', 'r50l32': 'R50+ViT-L_32',
    'r26x1': 'BiT-R26x1', 'r50x1': 'BiT-R50x1', 'r101x1': 'BiT-R101x1', 'r152x4': 'BiT-R152x4',
}


# config.model.classifier -> (prepends a class token, pools the tokens into one vector):
# 'token' classifies the class token, 'gap' the mean token, the unpooled two every token
# (logits [batch, tokens, classes]; 'token_unpooled' includes the class token).
CLASSIFIERS = {'token': (True, True), 'gap': (False, True), 'unpooled': (False, False),
               'token_unpooled': (True, False)}


def has_class_token(model_config: ml_collections.ConfigDict) -> bool:
  return CLASSIFIERS[model_config.classifier][0]


def is_pooled(model_config: ml_collections.ConfigDict) -> bool:
  return CLASSIFIERS[model_config.classifier][1]


def resnet_stride(resnet: Optional[ml_collections.ConfigDict]) -> int:
  """The ResNet stem's total stride: root conv + max pool = 4, then 2 per stage after the first
  (1 without a stem)."""
  if resnet is None:
    return 1
  return 4 * 2**max(len(resnet['num_layers']) - 1, 0)


# Model geometry: how many input pixels make a token, the patch grid at a resolution, and back.


def token_stride(model_config: ml_collections.ConfigDict) -> int:
  """Input pixels per transformer token along one side: the patch size, times the ResNet stem's
  total stride for hybrids; 1 for the ResNet alone, which has no tokens and pools its feature map
  at any resolution."""
  if model_config.transformer is None:
    return 1
  return model_config.patches.size[0] * resnet_stride(model_config.resnet)


def grid(model_config: ml_collections.ConfigDict, resolution: int) -> tuple[int, int]:
  """Patches per side that the transformer sees at `resolution` (a multiple of token_stride)."""
  size = resolution // token_stride(model_config)
  return size, size


def resolution_at_most(model_config: ml_collections.ConfigDict, resolution: int) -> int:
  """The largest multiple of token_stride not above `resolution`: a recipe's 384px is 378px for
  a /14 model, the 27x27 patch grid that the official code gets at 384px (its unpadded patch
  convolution drops the last 6 pixels)."""
  return resolution - resolution % token_stride(model_config)


def num_tokens(model_config: ml_collections.ConfigDict, resolution: int) -> int:
  """The encoder's sequence length at `resolution`: the patches (+ the class token)."""
  rows, cols = grid(model_config, resolution)
  return rows * cols + has_class_token(model_config)


def resolution_of_posemb(model_config: ml_collections.ConfigDict,
                         posemb_tokens: int) -> Optional[int]:
  """The square input resolution whose position embeddings have `posemb_tokens` rows (the class
  token's included where the model has one); None when the patches are not a square grid."""
  patches = posemb_tokens - has_class_token(model_config)
  size = math.isqrt(max(patches, 0))
  if not size or size * size != patches:
    return None
  return size * token_stride(model_config)


def canonical_name(name: str) -> str:
  """The model name an alias stands for ('b16' -> 'ViT-B_16'); other names as they are."""
  return ALIASES.get(name.lower(), name)


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """Returns a copy of the config for a model name or alias; raises naming the choices."""
  key = canonical_name(name)
  if key not in MODEL_CONFIGS:
    raise ValueError(
        f'Unknown model {name!r}. Known models: {", ".join(MODEL_CONFIGS)}; '
        f'aliases: {", ".join(ALIASES)}.')
  config = ml_collections.ConfigDict(MODEL_CONFIGS[key].to_dict())
  config.update(SPEED_SWITCHES)
  return config

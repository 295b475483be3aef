"""Analytic forward FLOPs per image (a multiply-add counts as 2 FLOPs).

Counts the matrix multiplications and convolutions, which are >99% of the work; norms,
softmax, GELU and additions are left out (as in the paper's and the usual MFU accounting).
"""
from typing import Sequence, Tuple

import ml_collections

from vit_jax import model_configs


def _conv(size: int, kernel: int, stride: int, c_in: int, c_out: int) -> Tuple[float, int]:
  """FLOPs and output size of a SAME-padded conv on a size x size input."""
  out = -(-size // stride)
  return 2.0 * out * out * kernel * kernel * c_in * c_out, out


def _resnet(size: int, num_layers: Sequence[int], width_factor: int) -> Tuple[float, int, int]:
  """FLOPs, output size and channels of the BiT ResNet stem."""
  width = int(64 * width_factor)
  flops, size = _conv(size, 7, 2, 3, width)
  size = -(-size // 2)  # max pool
  channels = width
  for stage, units in enumerate(num_layers):
    features = width * 2**stage
    for unit in range(units):
      stride = 2 if stage > 0 and unit == 0 else 1
      f1, _ = _conv(size, 1, 1, channels, features)
      f2, out = _conv(size, 3, stride, features, features)
      f3, _ = _conv(out, 1, 1, features, 4 * features)
      flops += f1 + f2 + f3
      if channels != 4 * features or stride != 1:
        flops += _conv(size, 1, stride, channels, 4 * features)[0]
      size, channels = out, 4 * features
  return flops, size, channels


def _block_flops(tokens: int, hidden: int, mlp_dim: int) -> float:
  return (2.0 * tokens * hidden * 3 * hidden  # q, k, v
          + 2.0 * 2 * tokens * tokens * hidden  # logits and weighted sum
          + 2.0 * tokens * hidden * hidden  # out projection
          + 2.0 * 2 * tokens * hidden * mlp_dim)  # MLP


def forward_flops(model_config: ml_collections.ConfigDict, resolution: int,
                  num_classes: int = 1000) -> float:
  """Forward FLOPs of one image at `resolution` x `resolution`."""
  flops, size, channels = 0.0, resolution, 3
  if model_config.get('resnet') is not None:
    flops, size, channels = _resnet(resolution, model_config.resnet.num_layers,
                                    model_config.resnet.width_factor)
  if model_config.hidden_size is not None:
    patch = model_config.patches.size[0]
    size //= patch
    flops += 2.0 * size * size * patch * patch * channels * model_config.hidden_size
    channels = model_config.hidden_size
  tokens = 1
  if model_config.transformer is not None:
    tokens = model_configs.num_tokens(model_config, resolution)
    flops += model_config.transformer.num_layers * _block_flops(tokens, channels,
                                                                model_config.transformer.mlp_dim)
  pooled = 1 if model_configs.is_pooled(model_config) else tokens
  features = channels
  if model_config.get('representation_size'):
    flops += 2.0 * pooled * channels * model_config.representation_size
    features = model_config.representation_size
  if num_classes:
    flops += 2.0 * pooled * features * num_classes
  return flops


def train_step_flops(model_config, resolution: int, num_classes: int) -> float:
  """Forward + backward (backward = 2x forward) per image."""
  return 3.0 * forward_flops(model_config, resolution, num_classes)

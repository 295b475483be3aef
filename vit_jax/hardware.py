"""Peak dense matmul throughput per device kind, for MFU (model FLOPs utilisation)."""
from typing import Optional

import jax

# Vendor figures, FLOP/s per device (one chip / GPU), dense (no sparsity), bf16 inputs.
PEAK_BF16_FLOPS = {
    'TPU v2': 45e12,
    'TPU v3': 123e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
    'NVIDIA A100': 312e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA L4': 121e12,
}


def peak_flops(device=None, override: Optional[float] = None) -> Optional[float]:
  """Peak FLOP/s of one device: `override` if given, else looked up by device kind.

  Kinds are matched by prefix ('NVIDIA H100 80GB HBM3' -> 'NVIDIA H100'); unknown kinds (CPUs
  among them) give None, and MFU is then not reported unless `override` is set.
  """
  if override:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_BF16_FLOPS[name]
  return None

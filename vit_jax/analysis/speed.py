"""Inference speed: images/s and peak memory of the forward pass on the default backend.

Throughput does not depend on parameter values, so models are timed with random parameters
(`benchmark_lib.random_params`). The timer and the peak-memory figure are
`vit_jax.benchmark_lib`'s: compilation and one warm-up call excluded, the median of the timed
calls, each waited for with `block_until_ready`.
"""
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import benchmark_lib
from vit_jax import hardware
from vit_jax import models


def measure(model_config, *, resolution: int, batch_size: int, num_classes: int = 1000,
            steps: int = 10, seed: int = 0) -> dict:
  """Times `steps` forward passes of a `batch_size` x `resolution`^2 batch."""
  model = models.build_model(model_config, num_classes)
  params = benchmark_lib.random_params(
      models.abstract_params(model_config, num_classes, resolution), seed=seed)
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(-1.0, 1.0, (batch_size, resolution, resolution, 3)),
                       jnp.float32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  compiled = forward.lower(params, images).compile()
  seconds = statistics.median(benchmark_lib.time_calls(
      lambda: compiled(params, images).block_until_ready(), steps))
  memory, memory_source = benchmark_lib.peak_memory()
  xla = hardware.xla_memory(compiled)
  device = jax.devices()[0]
  return {
      'model': model_config.model_name,
      'resolution': resolution,
      'batch_size': batch_size,
      'images_per_s': batch_size / seconds,
      'seconds_per_batch': seconds,
      'peak_memory_bytes': memory,
      'memory_source': memory_source,
      # XLA's own estimate for this one program: arguments + outputs + temporaries.
      'xla_program_bytes': xla and xla['total'],
      'backend': jax.default_backend(),
      'device': device.device_kind,
  }

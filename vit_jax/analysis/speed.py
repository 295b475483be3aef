"""Inference speed: images/s and peak memory of the forward pass on the default backend.

Throughput does not depend on parameter values, so models are timed with random initial
parameters. Compilation and one warm-up call are excluded; every timed call is waited for with
`block_until_ready`.
"""
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the device allocator's peak where the backend reports one (GPU, TPU), else
  the peak resident set size of this host process (CPU). Both are peaks over the whole process
  so far, so a sequence of measurements should run from the smallest configuration up."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host peak RSS'


def measure(model_config, *, resolution: int, batch_size: int, num_classes: int = 1000,
            steps: int = 10, seed: int = 0) -> dict:
  """Times `steps` forward passes of a `batch_size` x `resolution`^2 batch."""
  model = models.build_model(model_config, num_classes)
  rng = np.random.default_rng(seed)
  # Random values straight from numpy: compiling `model.init` would take longer than the timing.
  params = jax.tree.map(
      lambda leaf: jnp.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32)),
      models.abstract_params(model_config, num_classes, resolution))
  images = jnp.asarray(rng.uniform(-1.0, 1.0, (batch_size, resolution, resolution, 3)),
                       jnp.float32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  compiled = forward.lower(params, images).compile()
  compiled(params, images).block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    compiled(params, images).block_until_ready()
  seconds = (time.perf_counter() - start) / steps
  memory, memory_source = peak_memory()
  xla = compiled.memory_analysis()
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
      'xla_program_bytes': (None if xla is None else xla.argument_size_in_bytes +
                            xla.output_size_in_bytes + xla.temp_size_in_bytes -
                            xla.alias_size_in_bytes),
      'backend': jax.default_backend(),
      'device': device.device_kind,
  }

"""Vision Transformer in JAX/Flax. Importing the package sets the project's XLA:CPU flags
(`vit_jax.hardware.set_cpu_xla_flags`) before JAX starts a backend."""
from vit_jax import hardware as _hardware

_hardware.set_cpu_xla_flags()

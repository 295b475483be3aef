"""Learning-rate schedules and optimizers of the paper's recipes (appendix B)."""
import jax.numpy as jnp
import ml_collections
import optax

# Where linear decay ends, as in the official code (not 0: the last steps still learn a little).
LINEAR_DECAY_END = 1e-5

# config.decay_type -> the learning rate at `progress` in [0, 1] after the warm-up.
DECAYS = {
    'cosine': lambda progress, base_lr: base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)),
    'linear': lambda progress, base_lr: (
        LINEAR_DECAY_END + (base_lr - LINEAR_DECAY_END) * (1.0 - progress)),
}


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then `DECAYS[config.decay_type]` until `total_steps`
  (a warm-up of at least total_steps never reaches base_lr)."""
  base_lr, warmup, total = config.base_lr, config.warmup_steps, config.total_steps
  decay = DECAYS[config.decay_type]

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    return jnp.where(step < warmup, base_lr * warm, decay(progress, base_lr))

  return schedule


def _sgd(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  """SGD with momentum (fine-tuning), optionally with coupled weight decay."""
  opt = optax.sgd(schedule, momentum=config.momentum or None)
  if config.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(config.weight_decay), opt)
  return opt


def _adam(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  """Adam with decoupled weight decay (pre-training)."""
  return optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)


# config.optimizer -> (config, schedule) -> optax transformation.
OPTIMIZERS = {'sgd': _sgd, 'adam': _adam}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then config.optimizer (one of OPTIMIZERS) on the schedule."""
  opt = OPTIMIZERS[config.optimizer](config, learning_rate_schedule(config))
  if config.grad_norm_clip:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_norm_clip), opt)
  return opt

"""Learning-rate schedules and optimizers of the paper's recipes (appendix B)."""
import jax.numpy as jnp
import ml_collections
import optax

# Where linear decay ends, as in the official code (not 0: the last steps still learn a little).
LINEAR_DECAY_END = 1e-5


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then cosine decay to 0 or linear decay to
  LINEAR_DECAY_END at `total_steps`."""
  base_lr, warmup, total = config.base_lr, config.warmup_steps, config.total_steps
  if config.decay_type not in ('cosine', 'linear'):
    raise ValueError(f"config.decay_type={config.decay_type!r}; expected 'cosine' or 'linear'.")
  if not 0 <= warmup < total:
    raise ValueError(f'config.warmup_steps={warmup} must be in [0, total_steps={total}).')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
    if config.decay_type == 'cosine':
      decayed = base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      decayed = LINEAR_DECAY_END + (base_lr - LINEAR_DECAY_END) * (1.0 - progress)
    return jnp.where(step < warmup, base_lr * warm, decayed)

  return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then SGD+momentum (fine-tuning) or Adam+decoupled decay (pre-training)."""
  schedule = learning_rate_schedule(config)
  if config.optimizer == 'sgd':
    opt = optax.sgd(schedule, momentum=config.momentum or None)
    if config.weight_decay:
      opt = optax.chain(optax.add_decayed_weights(config.weight_decay), opt)
  elif config.optimizer == 'adam':
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r}; expected 'sgd' or 'adam'.")
  if config.grad_norm_clip:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_norm_clip), opt)
  return opt

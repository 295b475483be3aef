"""Pure train and eval steps, and the train state they act on.

The train state is a plain pytree `{'step', 'params', 'opt_state', 'rng'}`; the steps are jitted
once over the mesh with the shardings from `vit_jax.sharding` (batch over `data`; state
replicated or FSDP), the state buffers donated.
"""
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import optax

from vit_jax import sharding

State = Dict[str, Any]


# config.loss -> per-example loss of (logits, one-hot or smoothed targets). `sigmoid` treats
# every class as an independent binary problem.
LOSSES = {
    'softmax': optax.softmax_cross_entropy,
    'sigmoid': lambda logits, targets: jnp.sum(
        optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1),
}


def cross_entropy(logits, labels, *, num_classes: int, kind: str = 'softmax',
                  label_smoothing: float = 0.0):
  """Per-example loss `LOSSES[kind]` against the (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return LOSSES[kind](logits, targets)


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
               image_shape) -> State:
  """Fresh state from `model.init` (pure; jit it with out_shardings to create it sharded)."""
  init_rng, state_rng = jax.random.split(rng)
  params = model.init(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                      train=False)['params']
  return state_from_params(params, optimizer, state_rng)


def state_from_params(params, optimizer: optax.GradientTransformation, rng: jax.Array) -> State:
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt_state': optimizer.init(params), 'rng': rng}


def _microbatches(batch, accum_steps: int, mesh):
  """[B, ...] -> [accum, B/accum, ...] such that every micro-batch stays split over all devices.

  Example i goes to micro-batch i % accum, so each device's contiguous block of the batch
  contributes equally to every micro-batch and no data moves between devices.
  """
  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P(None, sharding.DATA)))
  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, num_classes: int, mesh) -> Callable:
  """Returns the pure `train_step(state, batch) -> (state, metrics)` (not yet jitted)."""
  accum_steps = config.accum_steps

  def loss_fn(params, images, labels, rng):
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
    losses = cross_entropy(logits, labels, num_classes=num_classes, kind=config.loss,
                           label_smoothing=config.label_smoothing)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.mean(losses), jnp.mean(correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated_grads(params, batch, rng):
    micro = _microbatches(batch, accum_steps, mesh)
    rngs = jax.random.split(rng, accum_steps)

    def body(carry, xs):
      (loss, acc), grads = grad_fn(params, xs[0]['image'], xs[0]['label'], xs[1])
      return jax.tree.map(jnp.add, carry, (grads, loss, acc)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
    (grads, loss, acc), _ = jax.lax.scan(body, zeros, (micro, rngs))
    return jax.tree.map(lambda g: g / accum_steps, (grads, loss, acc))

  def apply_update(grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def train_step(state: State, batch) -> tuple:
    rng, step_rng = jax.random.split(state['rng'])
    step_rng = jax.random.fold_in(step_rng, state['step'])
    if accum_steps == 1:
      (loss, acc), grads = grad_fn(state['params'], batch['image'], batch['label'], step_rng)
    else:
      grads, loss, acc = accumulated_grads(state['params'], batch, step_rng)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient leaves params and optimizer state as they were (no host sync:
    # the loop reads `is_finite` with the other metrics and applies config.nonfinite). A select
    # fuses into the update's one pass over the state, where a lax.cond would stop the gradients'
    # conversion from fusing into it and copy the state in its other branch (docs/PERFORMANCE.md,
    # "TPU, by the compiler").
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(is_finite, n, o), new, old)
    params, opt_state = keep_if_finite(
        apply_update(grads, state['opt_state'], state['params']),
        (state['params'], state['opt_state']))
    metrics = {'loss': loss, 'accuracy': acc, 'grad_norm': grad_norm, 'is_finite': is_finite}
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                 'rng': rng}
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """`eval_step(params, batch) -> {'correct', 'count'}`, padded examples (mask False) ignored."""

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask)}

  return eval_step


def jit_train_step(train_step, state_shardings, mesh):
  batch = sharding.batch_sharding(mesh)
  return jax.jit(sharding.with_activation_layout(train_step, mesh),
                 in_shardings=(state_shardings, batch),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_step, params_shardings, mesh):
  return jax.jit(sharding.with_activation_layout(eval_step, mesh),
                 in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))

"""The training program: the train state (a plain pytree `{'step', 'params', 'opt_state',
'rng'}`), the pure train and eval steps, and `Trainer`, which jits them once over the mesh with
the shardings of `vit_jax.sharding` (the state donated) and reads and writes released .npz.
"""
import os
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import optax

from vit_jax import checkpoint
from vit_jax import models
from vit_jax import optim
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
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.DATA)))
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

  def train_step(state: State, batch) -> tuple:
    rng, step_rng = jax.random.split(state['rng'])
    step_rng = jax.random.fold_in(step_rng, state['step'])
    if accum_steps == 1:
      (loss, acc), grads = grad_fn(state['params'], batch['image'], batch['label'], step_rng)
    else:
      grads, loss, acc = accumulated_grads(state['params'], batch, step_rng)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient leaves params and optimizer state as they were, with no host
    # sync (the loop reads `is_finite` with the metrics). A select, not a lax.cond, fuses into the
    # update's one pass over the state (docs/PERFORMANCE.md, "TPU, by the compiler").
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(is_finite, new, old),
        (optax.apply_updates(state['params'], updates), opt_state),
        (state['params'], state['opt_state']))
    metrics = {'loss': loss, 'accuracy': acc, 'grad_norm': grad_norm, 'is_finite': is_finite}
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                 'rng': rng}
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """`eval_step(params, batch) -> {'correct', 'count', 'nonfinite'}` (examples whose logits
  hold an Inf or NaN), padded examples (mask False) ignored."""

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    nonfinite = 1.0 - jnp.all(jnp.isfinite(logits), axis=-1).astype(jnp.float32)
    return {'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask),
            'nonfinite': jnp.sum(nonfinite * mask)}

  return eval_step


class Trainer:
  """Holds what the loop needs: model, mesh, optimizer, jitted steps and the sharded state's
  layout."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int, mesh=None):
    self.config = config
    self.num_classes = num_classes
    self.mesh = mesh or sharding.make_mesh()
    # The run's model, its matmuls laid out for the mesh's platform (which may be compiled for
    # ahead of time); its activations' layout is set where the steps are jitted.
    layout = models.resolve_layout(config.model.get('layout', 'auto'),
                                   self.mesh.devices.flat[0].platform)
    self.model = models.build_model(config.model, num_classes, dtype=jnp.dtype(config.dtype),
                                    head_bias_init=config.head_bias_init, layout=layout)
    self.optimizer = optim.make_optimizer(config)
    image_shape = (config.pp.resolution, config.pp.resolution, 3)
    self._init = lambda rng: init_state(self.model, self.optimizer, rng, image_shape)
    abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0))
    self.state_shardings = sharding.state_shardings(abstract, self.mesh, config.sharding)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)
    batch, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
    self.abstract_batch = {  # One global train batch, laid out as the train step takes it.
        'image': jax.ShapeDtypeStruct((config.batch, *image_shape), jnp.float32, sharding=batch),
        'label': jax.ShapeDtypeStruct((config.batch,), jnp.int32, sharding=batch)}
    with_layout = lambda step: sharding.with_activation_layout(step, self.mesh)
    self.train_step = jax.jit(
        with_layout(make_train_step(self.model, self.optimizer, config, num_classes, self.mesh)),
        in_shardings=(self.state_shardings, batch),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self.eval_step = jax.jit(with_layout(make_eval_step(self.model)),
                             in_shardings=(self.state_shardings['params'], batch),
                             out_shardings=replicated)

  def initial_state(self):
    """Fresh (or pre-trained) state, created directly in its sharded layout."""
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    state = init(jax.random.PRNGKey(self.config.seed))
    path = self.config.pretrained_path  # Else pretrained_dir/<model_name>.npz, else scratch.
    if not path and self.config.pretrained_dir:
      path = os.path.join(self.config.pretrained_dir, f'{self.config.model.model_name}.npz')
    if not path:
      return state
    params = self.load_released(path, init_params=jax.device_get(state['params']))
    state = state_from_params(params, self.optimizer, state['rng'])
    return jax.device_put(state, self.state_shardings)

  # A model with `scan_layers` holds its encoder blocks stacked: converted to and from the
  # released layout (of every .npz) here and nowhere else.

  def load_released(self, path: str, *, init_params=None, keep_head: bool = False):
    """A released-layout .npz adapted to this model (checkpoint.load_pretrained), in the
    model's own layout on the host. `init_params` (default: shapes only) supplies the fresh head
    when it is replaced."""
    init = self.abstract_state['params'] if init_params is None else init_params
    params = checkpoint.load_pretrained(
        pretrained_path=path, init_params=models.unstack_encoder_blocks(init),
        model_config=self.config.model, keep_head=keep_head)
    return models.stack_encoder_blocks(params) if self.model.scan_layers else params

  @staticmethod
  def released_params(params):
    """The model's parameters in the released layout (for save_npz)."""
    return models.unstack_encoder_blocks(params)

"""The compiled training program: model, mesh, optimizer, jitted steps, sharded state layout."""
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import checkpoint
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax import steps


def build_model(config: ml_collections.ConfigDict, num_classes: int, platform=None):
  """The run's model (its activations' layout is set where the steps are jitted), its matmuls
  laid out for `platform` (the mesh's devices': they may be compiled for ahead of time)."""
  layout = models.resolve_layout(config.model.get('layout', 'auto'), platform)
  return models.build_model(config.model, num_classes, dtype=jnp.dtype(config.dtype),
                            head_bias_init=config.head_bias_init, layout=layout)


def pretrained_path(config: ml_collections.ConfigDict) -> Optional[str]:
  if config.pretrained_path:
    return config.pretrained_path
  if config.pretrained_dir:
    return os.path.join(config.pretrained_dir, f'{config.model.model_name}.npz')
  return None


class Program:
  """Holds what the loop needs: model, mesh, jitted steps and the sharded state's layout."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int, mesh=None):
    self.config = config
    self.num_classes = num_classes
    self.mesh = mesh or sharding.make_mesh()
    self.model = build_model(config, num_classes, self.mesh.devices.flat[0].platform)
    self.optimizer = optim.make_optimizer(config)
    image_shape = (config.pp.resolution, config.pp.resolution, 3)
    self._init = lambda rng: steps.init_state(self.model, self.optimizer, rng, image_shape)
    abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0))
    self.state_shardings = sharding.state_shardings(abstract, self.mesh, config.sharding)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)
    batch_sharding = sharding.batch_sharding(self.mesh)
    self.abstract_batch = {  # One global train batch, laid out as the train step takes it.
        'image': jax.ShapeDtypeStruct((config.batch, *image_shape), jnp.float32,
                                      sharding=batch_sharding),
        'label': jax.ShapeDtypeStruct((config.batch,), jnp.int32, sharding=batch_sharding)}
    self.train_step = steps.jit_train_step(
        steps.make_train_step(self.model, self.optimizer, config, num_classes, self.mesh),
        self.state_shardings, self.mesh)
    self.eval_step = steps.jit_eval_step(
        steps.make_eval_step(self.model), self.state_shardings['params'], self.mesh)

  def initial_state(self):
    """Fresh (or pre-trained) state, created directly in its sharded layout."""
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    state = init(jax.random.PRNGKey(self.config.seed))
    path = pretrained_path(self.config)
    if path is None:
      return state
    params = self.load_released(path, init_params=jax.device_get(state['params']))
    state = steps.state_from_params(params, self.optimizer, state['rng'])
    return jax.device_put(state, self.state_shardings)

  # The released layout is the contract of every .npz read or written; a model with
  # `scan_layers` holds its encoder blocks stacked, converted here and nowhere else.

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

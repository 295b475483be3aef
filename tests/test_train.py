"""The train step and loop on 8 CPU devices: learning, accumulation, sharding (multi-host runs:
tests/test_multihost.py)."""
import importlib.util
import logging
import pathlib
import re

import jax
import numpy as np
import pytest

from tests import train_fixtures
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import evaluate
from vit_jax import model_configs
from vit_jax import optim
from vit_jax import plan_lib
from vit_jax import preprocessing
from vit_jax import sharding
from vit_jax import trainer as trainer_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_steps(config, num_steps, batches=None):
  trainer = train_fixtures.tiny_trainer(config)
  state = trainer.initial_state()
  batches = batches or list(train_fixtures.synthetic_batches(config, num_steps))
  losses = []
  for batch in batches:
    state, metrics = trainer.train_step(state, jax.device_put(
        batch, sharding.batch_sharding(trainer.mesh)))
    losses.append(float(metrics['loss']))
  return state, losses


def test_train_step_decreases_the_loss_on_a_fixed_batch():
  config = train_fixtures.tiny_config()
  batch = next(train_fixtures.synthetic_batches(config, 1))
  _, losses = _run_steps(config, 0, [batch] * 15)
  assert losses[-1] < 0.5 * losses[0]
  assert losses[0] == pytest.approx(np.log(10), rel=0.05)  # zero head: uniform predictions


def test_accumulation_gives_the_same_update_as_one_big_batch():
  # SGD: the update is linear in the gradient (Adam would magnify rounding in ~0 gradients).
  sgd = dict(optimizer='sgd', base_lr=0.1)
  batches = list(train_fixtures.synthetic_batches(train_fixtures.tiny_config(), 2))
  state1, losses1 = _run_steps(train_fixtures.tiny_config(accum_steps=1, **sgd), 0, batches)
  state4, losses4 = _run_steps(train_fixtures.tiny_config(accum_steps=4, **sgd), 0, batches)
  np.testing.assert_allclose(losses1, losses4, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(state1['params']), jax.device_get(state4['params']))


def test_fsdp_and_replicated_sharding_give_the_same_result(monkeypatch):
  monkeypatch.setattr(sharding, 'FSDP_MIN_SIZE', 64)  # so that the tiny model's leaves split
  batches = list(train_fixtures.synthetic_batches(train_fixtures.tiny_config(), 3))
  state_r, losses_r = _run_steps(train_fixtures.tiny_config(sharding='replicate'), 0, batches)
  config = train_fixtures.tiny_config(sharding='fsdp')
  state_f, losses_f = _run_steps(config, 0, batches)
  np.testing.assert_allclose(losses_r, losses_f, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(state_r['params']), jax.device_get(state_f['params']))
  # FSDP really splits parameters and the optimizer state alike.
  kernel = state_f['params']['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'data')  # (16, 32)
  mu = state_f['opt_state'][1][0].mu['embedding']['kernel']  # Adam's first moment, (4,4,3,16)
  assert mu.sharding.spec == jax.sharding.PartitionSpec(None, None, None, 'data')
  assert sharding.fsdp_spec((16,), 8) == jax.sharding.PartitionSpec()


def _collective_shapes(config) -> list:
  """(op, result dims) of every collective in the compiled FSDP train step."""
  trainer = train_fixtures.tiny_trainer(config)
  hlo = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch).compile().as_text()
  found = re.findall(r'= \w+\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all)\(',
                     hlo)
  return [(op, tuple(int(d) for d in dims.split(',') if d)) for dims, op in found]


def test_fsdp_gathers_weights_not_the_global_batchs_activations(monkeypatch):
  monkeypatch.setattr(sharding, 'FSDP_MIN_SIZE', 64)
  config = train_fixtures.tiny_config(sharding='fsdp')
  # Scanned blocks are where XLA's partitioner, left alone, carries the weights' layout into the
  # activations (unscanned, it happens to gather the weights at this size).
  config.model.scan_layers = True
  tokens = (config.pp.resolution // config.model.patches.size[0])**2 + 1

  def activation_collectives():
    # Tensors of the whole global batch: [batch, tokens, ...], [batch, heads, tokens, tokens],
    # the image patches [batch, rows, cols, ...], or the dense layers' operands flattened to
    # [batch * tokens, features] (models.TokenDense).
    return [(op, dims) for op, dims in _collective_shapes(config)
            if (len(dims) >= 3 and dims[0] == config.batch)
            or (len(dims) == 2 and dims[0] == config.batch * tokens)]

  shapes = _collective_shapes(config)
  assert ('all-gather', (16, 32)) in shapes  # an MLP kernel, gathered for use
  assert not activation_collectives()
  # Without the activation layout pinned, XLA's partitioner gathers activations instead.
  monkeypatch.setattr(sharding, 'LOGICAL_RULES', ())
  assert activation_collectives()


def test_same_config_and_seed_give_the_same_curve_and_another_seed_does_not():
  config = train_fixtures.tiny_config()
  config.model.transformer.dropout_rate = 0.2
  batches = list(train_fixtures.synthetic_batches(config, 3))
  _, a = _run_steps(config, 0, batches)
  _, b = _run_steps(config, 0, batches)
  assert a == b
  config.seed = 1
  _, c = _run_steps(config, 0, batches)
  assert a != c


def test_schedule_warmup_then_cosine_and_linear():
  config = train_fixtures.tiny_config(base_lr=1.0, warmup_steps=10, total_steps=110,
                                      decay_type='cosine')
  lr = optim.learning_rate_schedule(config)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-7)
  config.decay_type = 'linear'
  lr = optim.learning_rate_schedule(config)
  end = optim.LINEAR_DECAY_END
  assert float(lr(35)) == pytest.approx(end + (1.0 - end) * 0.75)
  assert float(lr(110)) == pytest.approx(1e-5)  # The official code's end, not 0.


def test_optimizers_follow_the_recipes():
  params = {'w': np.ones(3, np.float32)}
  grads = {'w': np.array([30.0, 40.0, 0.0], np.float32)}  # global norm 50 -> clipped to 1
  sgd = optim.make_optimizer(train_fixtures.tiny_config(
      optimizer='sgd', momentum=0.9, base_lr=0.1, warmup_steps=0, total_steps=10,
      decay_type='linear', grad_norm_clip=1.0))
  updates, _ = sgd.update(grads, sgd.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.06, -0.08, 0.0], rtol=1e-6)
  adam = optim.make_optimizer(train_fixtures.tiny_config(
      optimizer='adam', base_lr=0.1, weight_decay=0.5, warmup_steps=0, total_steps=10,
      decay_type='linear', grad_norm_clip=0.0))
  updates, _ = adam.update(grads, adam.init(params), params)
  # First Adam step: -lr * (sign(g) + wd * w), with decoupled weight decay.
  np.testing.assert_allclose(updates['w'], [-0.15, -0.15, -0.05], rtol=1e-4)


def test_sigmoid_loss_and_label_smoothing_by_hand():
  logits = np.array([[0.0, 0.0]], np.float32)
  np.testing.assert_allclose(
      trainer_lib.cross_entropy(logits, np.array([1]), num_classes=2, kind='sigmoid'),
      [2 * np.log(2)], rtol=1e-6)
  logits = np.array([[2.0, 0.0]], np.float32)
  p = np.exp(logits[0]) / np.exp(logits[0]).sum()
  expected = -(0.95 * np.log(p[0]) + 0.05 * np.log(p[1]))
  np.testing.assert_allclose(
      trainer_lib.cross_entropy(logits, np.array([0]), num_classes=2, label_smoothing=0.1),
      [expected], rtol=1e-6)


# One out-of-range value per numeric field, and the bound it breaks.
NUMERIC_ERRORS = [
    ('batch', 0, '>= 1'), ('batch', -8, '>= 1'), ('batch_eval', 0, '>= 1'),
    ('pp.resolution', 0, '>= 1'), ('pp.resize', 0, '>= 1'), ('pp.area_min', 0.0, '> 0'),
    ('pp.area_min', 1.5, '<= 1'), ('shuffle_buffer', 0, '>= 1'), ('prefetch', -1, '>= 0'),
    ('num_classes', 0, '>= 1'), ('total_steps', 0, '>= 1'), ('accum_steps', 0, '>= 1'),
    ('base_lr', -0.1, '>= 0'), ('momentum', 1.0, '< 1'), ('momentum', -0.5, '>= 0'),
    ('b1', 1.0, '< 1'), ('b2', 1.5, '< 1'), ('weight_decay', -1e-4, '>= 0'),
    ('grad_norm_clip', -1.0, '>= 0'), ('label_smoothing', 1.0, '< 1'),
    ('peak_flops', 0.0, '> 0'), ('log_every', 0, '>= 1'), ('eval_every', 0, '>= 1'),
    ('checkpoint_every', -1, '>= 0'), ('keep_checkpoints', 0, '>= 1'),
    ('warmup_steps', -1, '>= 0'),
]
# One value outside its table per field of config_lib.CHOICES.
CHOICE_ERRORS = [
    ('loss', 'hinge'), ('sharding', 'tp'), ('optimizer', 'lamb'), ('decay_type', 'step'),
    ('dtype', 'float16'), ('nonfinite', 'ignore'), ('model.attention_impl', 'flash'),
    ('model.remat_policy', 'most'), ('model.posemb', 'learned'), ('model.classifier', 'cls'),
    ('pp.train', 'random'), ('pp.eval', 'squash'), ('model.layout', 'rows'),
]


def test_every_choice_is_checked_and_the_pp_names_are_preprocessings():
  assert {field for field, _ in CHOICE_ERRORS} == set(config_lib.CHOICES)
  assert config_lib.PP_TRAIN == tuple(preprocessing.TRAIN_CROPS)
  assert config_lib.PP_EVAL == tuple(preprocessing.EVAL_RESIZES)


def test_every_numeric_field_is_range_checked_and_the_defaults_pass():
  assert {field for field, _, _ in NUMERIC_ERRORS} == set(config_lib.RANGES)
  config_lib.validate(config_lib.base_config(), num_devices=8, process_count=2)


@pytest.mark.parametrize('overrides,message', [
    ({'batch': 30}, 'config.batch=30 / config.accum_steps=1 = 30 is not divisible by the 8'),
    ({'batch': 32, 'accum_steps': 3}, 'not divisible by config.accum_steps=3'),
    ({'batch': 32, 'accum_steps': 8}, '= 4 is not divisible by the 8 devices'),
    ({'pp.resolution': 18}, 'config.pp.resolution=18 is not a multiple of the patch size 4'),
] + [({field: value}, f'config.{field}={value!r}; expected one of')
     for field, value in CHOICE_ERRORS]
  + [({field: value}, f'config.{field}={value!r} must be {bound}')
     for field, value, bound in NUMERIC_ERRORS])
def test_config_errors_name_the_field(overrides, message):
  config = plan_lib.with_changes(train_fixtures.tiny_config(), overrides)
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('+', r'\+')):
    config_lib.validate(config, num_devices=8, process_count=1)


def _recipe(path: str):
  spec = importlib.util.spec_from_file_location('recipe', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', ['configs/vit.py', 'configs/pretrain.py'])
def test_the_shipped_recipes_are_valid_for_every_model(path):
  recipe = _recipe(path)
  for name in model_configs.MODEL_CONFIGS:
    config = recipe.get_config(f'{name},imagenet2012')
    config_lib.validate(config, num_devices=8, process_count=1)
  # The fine-tuning recipe's 384px is 27 x 14 = 378px for ViT-H/14 (384 = 27 x 14 + 6).
  expected = {'configs/vit.py': (384, 378), 'configs/pretrain.py': (224, 224)}[path]
  assert tuple(recipe.get_config(f'{name},imagenet2012').pp.resolution
               for name in ('ViT-L_16', 'ViT-H_14')) == expected


def test_warmup_at_least_total_steps_runs_with_a_warning(caplog):
  config = train_fixtures.tiny_config(warmup_steps=500, total_steps=100, base_lr=0.5)
  with caplog.at_level(logging.WARNING):
    config_lib.validate(config, num_devices=8, process_count=1)
  assert 'config.warmup_steps=500 >= config.total_steps=100' in caplog.text
  schedule = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(50), schedule(99)], [0, 0.05, 0.099],
                             rtol=1e-6)


def test_global_batch_4096_is_a_config_value():
  config = train_fixtures.tiny_config(batch=4096, accum_steps=16)
  config_lib.validate(config, num_devices=8, process_count=2)
  batch = {'image': np.zeros((4096, 2), np.float32), 'label': np.arange(4096)}
  mesh = sharding.make_mesh()
  micro = jax.jit(lambda b: trainer_lib._microbatches(b, 16, mesh))(  # pylint: disable=protected-access
      jax.device_put(batch, sharding.batch_sharding(mesh)))
  assert micro['label'].shape == (16, 256)
  # Micro-batch j holds examples j, j+16, ...: every device keeps its own rows.
  np.testing.assert_array_equal(micro['label'][3], np.arange(3, 4096, 16))
  assert micro['label'].sharding.spec == jax.sharding.PartitionSpec(None, 'data')


def test_scanned_run_reads_and_writes_the_released_layout_and_matches_the_plain_run(tmp_path):
  """`config.model.scan_layers`: a released .npz goes in, the same training happens, and the
  parameters come back out in the released layout."""
  sgd = dict(optimizer='sgd', base_lr=0.1)  # Adam would magnify rounding in ~0 gradients.
  plain = train_fixtures.tiny_config(**sgd)
  pretrained = str(tmp_path / 'pretrained.npz')
  checkpoint.save_npz(jax.device_get(train_fixtures.tiny_trainer(plain).initial_state()['params']),
                      pretrained)
  batches = list(train_fixtures.synthetic_batches(plain, 3))
  plain.pretrained_path = pretrained
  state_p, losses_p = _run_steps(plain, 0, batches)
  scanned = train_fixtures.tiny_config(pretrained_path=pretrained, **sgd)
  scanned.model.scan_layers = True
  scanned.model.remat_policy = 'full'
  state_s, losses_s = _run_steps(scanned, 0, batches)
  assert 'encoderblock' in state_s['params']['Transformer']
  np.testing.assert_allclose(losses_p, losses_s, rtol=1e-5)
  trainer_s = train_fixtures.tiny_trainer(scanned)
  released = trainer_s.released_params(jax.device_get(state_s['params']))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(state_p['params']), released)
  # Evaluation of a released .npz goes through the same conversion.
  loaded = evaluate.checkpoint_params(trainer_s, pretrained)
  np.testing.assert_array_equal(
      loaded['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel'][1],
      checkpoint.load(pretrained)['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_0']['kernel'])

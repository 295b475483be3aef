"""Analyses: rollout, attention distance, embeddings, few-shot, plots and the analyze command.

The helpers below (tiny checkpoints, workdirs and image folders) are shared with
test_predict_report.py.
"""
import itertools
import json
import math
import os
import shutil

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from vit_jax import analyze
from vit_jax import checkpoint
from vit_jax import inference
from vit_jax import model_configs
from vit_jax import models
from vit_jax.analysis import attention
from vit_jax.analysis import embeddings
from vit_jax.analysis import fewshot
from vit_jax.analysis import plots

# ---------------------------------------------------------------------------------------------
# Shared helpers.

NUM_CLASSES = 3
CLASS_COLOURS = ((220, 30, 30), (30, 200, 30), (30, 30, 220))


def tiny_model_config(patch: int = 4) -> ml_collections.ConfigDict:
  config = model_configs.get_model_config('micro')
  config.patches.size = (patch, patch)
  return config


def init_params(model_config, num_classes: int, resolution: int, head_bias=None) -> dict:
  """Random normal parameters (numpy: compiling `model.init` takes many seconds) with a zero
  head kernel, so the logits are `head_bias` (default zeros) for every image."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: 0.3 * rng.standard_normal(leaf.shape, np.float32),
                        models.abstract_params(model_config, num_classes, resolution))
  params['head']['kernel'] = np.zeros_like(params['head']['kernel'])
  params['head']['bias'] = np.asarray(
      np.zeros(num_classes) if head_bias is None else head_bias, np.float32)
  return params


def write_npz(tmp_path, name: str = 'micro.npz', resolution: int = 32, head_bias=None) -> str:
  """A checkpoint of the registered 'micro' model (patch 16) at `resolution`."""
  params = init_params(model_configs.get_model_config('micro'), NUM_CLASSES, resolution,
                       head_bias)
  return checkpoint.save_npz(params, str(tmp_path / name))


def write_image_folder(root) -> str:
  """folder: dataset of 3 classes x 12 noisy solid-colour 20x20 PNGs (2 per class for test)."""
  rng = np.random.default_rng(0)
  for label, colour in enumerate(CLASS_COLOURS):
    os.makedirs(root / f'class{label}', exist_ok=True)
    for i in range(12):
      pixels = np.clip(np.array(colour) + rng.normal(0, 10, (20, 20, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(root / f'class{label}' / f'{i}.png')
  return str(root)


def write_workdir(tmp_path, *, head_bias=None, metrics=None) -> str:
  """A finished training workdir: model.npz and config.json of a patch-4 'micro' model trained
  at 16px on a folder dataset, plus metrics.jsonl when `metrics` is given."""
  workdir = tmp_path / 'workdir'
  os.makedirs(workdir, exist_ok=True)
  config = ml_collections.ConfigDict({
      'model_name': 'micro', 'model': tiny_model_config(), 'num_classes': NUM_CLASSES,
      'dataset': 'folder:' + write_image_folder(tmp_path / 'images'), 'data_dir': None,
      'train_split': 'train', 'eval_split': 'test', 'batch_eval': 8,
      'pp': {'train': 'resize_crop', 'eval': 'resize', 'resolution': 16}})
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  checkpoint.save_npz(init_params(config.model, NUM_CLASSES, 16, head_bias),
                      str(workdir / 'model.npz'))
  if metrics is not None:
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in metrics))
  return str(workdir)


def parse_flags(define_flags, argv) -> flags.FlagValues:
  """A fresh FlagValues with a command's flags, parsed from `argv` (without the program name)."""
  fv = flags.FlagValues()
  define_flags(fv)
  fv(['prog'] + list(argv))
  return fv


def assert_png(path: str) -> None:
  with Image.open(path) as image:
    assert image.format == 'PNG'
    image.verify()


# ---------------------------------------------------------------------------------------------
# Attention rollout.


def _random_attention(rng, shape):
  logits = rng.normal(size=shape)
  return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def test_rollout_of_identity_attention_is_identity():
  weights = np.broadcast_to(np.eye(5), (2, 3, 4, 5, 5))
  result = np.asarray(attention.rollout(jnp.asarray(weights)))
  np.testing.assert_allclose(result, np.broadcast_to(np.eye(5), (2, 5, 5)), atol=1e-6)
  class_row = np.asarray(attention.rollout_map(jnp.asarray(weights), (2, 2), True))
  np.testing.assert_allclose(class_row, np.zeros((2, 2, 2)), atol=1e-6)


def test_rollout_matches_a_plain_loop():
  weights = _random_attention(np.random.default_rng(0), (2, 3, 4, 5, 5))
  expected = []
  for b in range(2):
    flow = np.eye(5)
    for layer in range(3):
      # Rows of the head average sum to 1, so "add I and renormalise" is the 50/50 mix.
      mixed = 0.5 * weights[b, layer].mean(axis=0) + 0.5 * np.eye(5)
      flow = mixed @ flow
    expected.append(flow)
  result = np.asarray(attention.rollout(jnp.asarray(weights, jnp.float32)))
  np.testing.assert_allclose(result, np.stack(expected), rtol=1e-5)
  np.testing.assert_allclose(result.sum(-1), 1.0, rtol=1e-5)


def test_rollout_map_takes_the_class_row_or_the_mean_row():
  weights = jnp.asarray(_random_attention(np.random.default_rng(1), (1, 2, 2, 5, 5)), jnp.float32)
  full = np.asarray(attention.rollout(weights))[0]
  np.testing.assert_allclose(attention.rollout_map(weights, (2, 2), True)[0],
                             full[0, 1:].reshape(2, 2), rtol=1e-6)
  gap = _random_attention(np.random.default_rng(2), (1, 2, 2, 4, 4))
  np.testing.assert_allclose(attention.rollout_map(jnp.asarray(gap, jnp.float32), (2, 2), False)[0],
                             np.asarray(attention.rollout(jnp.asarray(gap, jnp.float32)))[0]
                             .mean(0).reshape(2, 2), rtol=1e-6)


def _jitted_attention_weights(model, params, images):
  return jax.jit(lambda p, x: attention.attention_weights(model, p, x))(params, images)


def test_attention_weights_come_in_layer_order_and_are_distributions():
  config = tiny_model_config()
  params = init_params(config, NUM_CLASSES, 8)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)), jnp.float32)
  weights = _jitted_attention_weights(models.build_model(config, NUM_CLASSES), params, images)
  assert weights.shape == (3, 2, 2, 5, 5)  # batch, layers, heads, 1 + 2*2 tokens
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  # Dropping the second block changes only the second layer's attention.
  one_layer = ml_collections.ConfigDict(config.to_dict())
  one_layer.transformer.num_layers = 1
  first = _jitted_attention_weights(models.build_model(one_layer, NUM_CLASSES), {
      **params, 'Transformer': {k: v for k, v in params['Transformer'].items()
                                if k != 'encoderblock_1'}}, images)
  np.testing.assert_allclose(first[:, 0], weights[:, 0], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Mean attention distance.


def _brute_force_mean_pair_distance(rows, cols, patch_px):
  cells = list(itertools.product(range(rows), range(cols)))
  return np.mean([math.dist(a, b) * patch_px for a, b in itertools.product(cells, cells)])


@pytest.mark.parametrize('has_cls', [True, False])
def test_uniform_attention_distance_is_the_mean_pairwise_patch_distance(has_cls):
  tokens = 9 + has_cls
  weights = jnp.full((2, 3, 4, tokens, tokens), 1.0 / tokens)
  result = attention.mean_attention_distance(weights, (3, 3), 16, has_cls)
  np.testing.assert_allclose(result, _brute_force_mean_pair_distance(3, 3, 16), rtol=1e-5)


def test_identity_attention_has_distance_zero():
  weights = jnp.broadcast_to(jnp.eye(10), (1, 2, 3, 10, 10))
  np.testing.assert_allclose(attention.mean_attention_distance(weights, (3, 3), 16, True), 0.0,
                             atol=1e-6)


def test_attention_to_the_neighbour_is_one_patch_away():
  # 1x2 grid with a class token; each patch attends half to the class token, half to the other
  # patch: after leaving out the class token, all attention is one patch (8 px) away.
  weights = jnp.array([[[[[1.0, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0]]]]])
  np.testing.assert_allclose(attention.mean_attention_distance(weights, (1, 2), 8, True), 8.0)


# ---------------------------------------------------------------------------------------------
# Embeddings.


def test_principal_components_recover_a_rank_two_kernel():
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.normal(size=(2 * 2 * 3, 2)))  # Orthonormal columns a, b.
  u, v = rng.normal(size=50) * 5, rng.normal(size=50)
  u, v = u - u.mean(), v - v.mean()
  v -= (v @ u) / (u @ u) * u  # Uncorrelated coefficients: the components are exactly a and b.
  kernel = (np.outer(basis[:, 0], u) + np.outer(basis[:, 1], v)).reshape(2, 2, 3, 50)
  components, explained = embeddings.principal_components(kernel, 3)
  assert components.shape == (3, 2, 2, 3)
  for i in range(2):
    found = components[i].ravel()
    assert abs(abs(found @ basis[:, i]) - 1.0) < 1e-8
  np.testing.assert_allclose(explained[:2].sum(), 1.0, rtol=1e-8)
  assert explained[0] > explained[1] and explained[2] < 1e-12


def test_cosine_similarity_by_hand():
  similarity = embeddings.cosine_similarity(np.array([[1.0, 0], [0, 2.0], [3.0, 3.0]]))
  np.testing.assert_allclose(similarity, [[1, 0, 1 / math.sqrt(2)], [0, 1, 1 / math.sqrt(2)],
                                          [1 / math.sqrt(2), 1 / math.sqrt(2), 1]], atol=1e-12)


def test_position_similarity_of_a_model_is_symmetric_with_unit_diagonal():
  params = init_params(tiny_model_config(), NUM_CLASSES, 12)
  posemb = embeddings.patch_position_embeddings(params, has_class_token=True)
  assert posemb.shape == (9, 16)
  similarity = embeddings.cosine_similarity(posemb)
  np.testing.assert_allclose(np.diag(similarity), 1.0, rtol=1e-6)
  np.testing.assert_allclose(similarity, similarity.T)


# ---------------------------------------------------------------------------------------------
# Few-shot.


def test_least_squares_by_hand():
  # Features 0 and 1 for classes 0 and 1; targets (1, -1) and (-1, 1) are fitted exactly by
  # W = [[-2, 2]], b = [1, -1].
  weights, bias = fewshot.fit_least_squares(np.array([[0.0], [1.0]]), np.array([0, 1]), 2, 0.0)
  np.testing.assert_allclose(weights, [[-2.0, 2.0]], atol=1e-12)
  np.testing.assert_allclose(bias, [1.0, -1.0], atol=1e-12)


def test_sample_shots_draws_distinct_examples_of_every_class():
  labels = np.array([0, 1, 2] * 10)
  chosen = fewshot.sample_shots(labels, 3, 5, np.random.default_rng(0))
  assert len(set(chosen)) == 15
  assert np.bincount(labels[chosen]).tolist() == [5, 5, 5]
  with pytest.raises(ValueError, match='Class 1 has 1 examples'):
    fewshot.sample_shots(np.array([0, 0, 1]), 2, 2, np.random.default_rng(0))


def test_fewshot_on_linearly_separable_features_is_perfect():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 8)) * 10
  train_y, eval_y = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 20)
  train_x = centres[train_y] + rng.normal(size=(120, 8))
  eval_x = centres[eval_y] + rng.normal(size=(80, 8))
  results = fewshot.evaluate(train_x, train_y, eval_x, eval_y, num_classes=4, shots=(1, 5),
                             seeds=3, l2_reg=1.0)
  assert results[1]['mean'] == results[5]['mean'] == 1.0
  assert len(results[5]['accuracies']) == 3
  # Random features cannot be separated: chance-level accuracy shows the test can fail.
  noise = fewshot.evaluate(rng.normal(size=(120, 8)), train_y, rng.normal(size=(80, 8)), eval_y,
                           num_classes=4, shots=(5,), seeds=3, l2_reg=1.0)
  assert noise[5]['mean'] < 0.6


# ---------------------------------------------------------------------------------------------
# Plots.


def test_mosaic_places_tiles_row_major_with_padding():
  tiles = np.arange(3 * 2 * 2, dtype=float).reshape(3, 2, 2)
  out = plots.mosaic(tiles, columns=2, fill=-1.0)
  assert out.shape == (5, 5)
  np.testing.assert_array_equal(out[:2, :2], tiles[0])
  np.testing.assert_array_equal(out[:2, 3:], tiles[1])
  np.testing.assert_array_equal(out[3:, :2], tiles[2])
  assert (out[2] == -1).all() and (out[3:, 3:] == -1).all()


def test_upsample_keeps_a_constant_map_and_the_size():
  up = plots.upsample(np.full((2, 3), 0.25), (8, 12))
  assert up.shape == (8, 12)
  np.testing.assert_allclose(up, 0.25, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The analyze command on a tiny model.


def _analyze(argv):
  return analyze.run(parse_flags(analyze.define_flags, argv))


def test_token_stride_of_vit_and_hybrids():
  assert model_configs.token_stride(model_configs.get_model_config('ViT-B_16')) == 16
  assert model_configs.token_stride(model_configs.get_model_config('R50+ViT-B_16')) == 16
  assert model_configs.token_stride(model_configs.get_model_config('R26+ViT-B_32')) == 32
  assert model_configs.token_stride(model_configs.get_model_config('R+ViT-Ti_16')) == 32
  b16 = model_configs.get_model_config('ViT-B_16')
  assert model_configs.grid(b16, 384) == (24, 24) and model_configs.num_tokens(b16, 384) == 577
  assert model_configs.resolution_of_posemb(b16, 577) == 384
  assert model_configs.resolution_of_posemb(b16, 578) is None
  gap = model_configs.get_model_config('ViT-B_16-gap-norep')
  assert model_configs.num_tokens(gap, 224) == 196
  assert model_configs.resolution_of_posemb(gap, 196) == 224


def test_analyze_posemb_similarity_and_filters_of_a_npz(tmp_path):
  npz = write_npz(tmp_path)
  out = tmp_path / 'out'
  result = _analyze(['--analysis=posemb_similarity', f'--checkpoint={npz}', '--model=micro',
                     f'--out_dir={out}'])
  assert_png(result['png'])
  with open(result['json']) as f:
    similarity = json.load(f)
  assert similarity['grid'] == [2, 2]
  np.testing.assert_allclose(np.diag(similarity['similarity']), 1.0, rtol=1e-6)
  result = _analyze(['--analysis=filters', f'--checkpoint={npz}', '--model=micro',
                     '--num_components=5', f'--out_dir={out}'])
  assert_png(result['png'])
  with open(result['json']) as f:
    assert np.asarray(json.load(f)['components']).shape == (5, 16, 16, 3)


def test_analyze_attention_maps_of_image_files(tmp_path):
  workdir = write_workdir(tmp_path)
  out = tmp_path / 'out'
  folder = tmp_path / 'two_images'
  os.makedirs(folder)
  for i in range(2):
    shutil.copy(tmp_path / 'images' / 'class2' / f'{i}.png', folder / f'{i}.png')
  (folder / 'notes.txt').write_text('not an image; skipped by its extension')
  images = [str(tmp_path / 'images' / 'class0' / '0.png'), str(folder)]
  result = _analyze(['--analysis=attention_maps', f'--checkpoint={workdir}',
                     f'--images={",".join(images)}', f'--out_dir={out}', '--batch_size=2'])
  assert [os.path.basename(p) for p in result['png']] == [
      'attention_map_000_0.png', 'attention_map_001_0.png', 'attention_map_002_1.png']
  for path in result['png']:
    assert_png(path)
  with open(result['json']) as f:
    maps = json.load(f)['maps']
  heat = np.asarray(maps[images[0]])
  assert heat.shape == (4, 4) and (heat > 0).all() and heat.sum() < 1.0  # The rest stays on cls.


def test_analyze_attention_distance_of_the_eval_split(tmp_path):
  workdir = write_workdir(tmp_path)
  result = _analyze(['--analysis=attention_distance', f'--checkpoint={workdir}',
                     f'--out_dir={tmp_path / "out"}', '--num_images=5'])
  assert_png(result['png'])
  with open(result['json']) as f:
    summary = json.load(f)
  assert summary['num_images'] == 5 and summary['patch_size_px'] == 4
  distances = np.asarray(summary['mean_distance_px'])
  assert distances.shape == (2, 2)  # layers x heads
  # Between identity attention (0) and attention to the farthest patch of a 4x4 grid of 4px.
  assert (distances > 0).all() and (distances < 3 * 4 * math.sqrt(2)).all()


def test_analyze_fewshot_with_the_workdir_dataset(tmp_path):
  workdir = write_workdir(tmp_path)
  result = _analyze(['--analysis=fewshot', f'--checkpoint={workdir}', '--shots=1,5',
                     '--fewshot_seeds=2', f'--out_dir={tmp_path / "out"}'])
  with open(result['json']) as f:
    summary = json.load(f)
  assert summary['pool_size'] == 30 and summary['num_eval'] == 6
  assert summary['feature_dim'] == 16
  assert set(summary['results']) == {'1', '5'}
  for r in summary['results'].values():
    assert len(r['accuracies']) == 2 and all(0 <= a <= 1 for a in r['accuracies'])


def test_analyze_speed(tmp_path):
  result = _analyze(['--analysis=speed', '--speed_models=micro', '--resolutions=16',
                     '--batch_sizes=2,1', '--speed_steps=2', f'--out_dir={tmp_path / "out"}'])
  with open(result['json']) as f:
    records = json.load(f)
  assert [r['batch_size'] for r in records] == [1, 2]
  for r in records:
    assert r['model'] == 'micro' and r['resolution'] == 16
    assert r['images_per_s'] > 0 and r['peak_memory_bytes'] > 0
    assert r['memory_source'] in ('device peak_bytes_in_use', 'host max RSS')


def test_analyze_rejects_an_undecodable_image(tmp_path):
  workdir = write_workdir(tmp_path)
  bad = tmp_path / 'broken.png'
  bad.write_text('not an image')
  with pytest.raises(ValueError, match='Cannot decode image file .*broken.png'):
    _analyze(['--analysis=attention_maps', f'--checkpoint={workdir}', f'--images={bad}',
              f'--out_dir={tmp_path / "out"}'])


def test_analyze_rejects_a_checkpoint_of_another_model(tmp_path):
  npz = write_npz(tmp_path)
  with pytest.raises(ValueError, match=r'does not fit.*ViT-Ti_16'):
    _analyze(['--analysis=posemb_similarity', f'--checkpoint={npz}', '--model=ViT-Ti_16',
              f'--out_dir={tmp_path / "out"}'])
  with pytest.raises(ValueError, match='Unknown model'):
    _analyze(['--analysis=posemb_similarity', f'--checkpoint={npz}', '--model=ViT-Q_16',
              f'--out_dir={tmp_path / "out"}'])


def test_analyze_needs_a_checkpoint_for_model_analyses(tmp_path):
  with pytest.raises(ValueError, match='needs --checkpoint'):
    _analyze(['--analysis=filters', f'--out_dir={tmp_path}'])

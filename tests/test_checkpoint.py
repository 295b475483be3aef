"""Released checkpoints: load/save, big_vision conversion, adaptation to a model, inspect, fetch."""
import functools
import http.server
import io
import math
import os
import socket
import subprocess
import sys
import threading
import time

from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vit_jax import checkpoint
from vit_jax import model_configs
from vit_jax import models
from vit_jax import weights

POSEMB = 'Transformer/posembed_input/pos_embedding'


def _config(**overrides):
  config = model_configs.get_model_config('micro')
  for key, value in overrides.items():
    config[key] = value
  return config


def _hybrid_config():
  return _config(patches={'size': (1, 1)}, resnet={'num_layers': (1,), 'width_factor': 1})


def _shapes(config, num_classes, resolution):
  model = models.build_model(config, num_classes)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
      jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32))
  return {k: v.shape for k, v in traverse_util.flatten_dict(variables['params'], sep='/').items()}


def _random_flat(config, num_classes=10, resolution=32, seed=0):
  """Flat released-layout tree of random float32 arrays in the model's shapes."""
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32)
          for k, s in sorted(_shapes(config, num_classes, resolution).items())}


def _init_params(config, num_classes, resolution):
  """Stand-in for `model.init`: random params with the zero head of a fresh model."""
  flat = _random_flat(config, num_classes, resolution, seed=99)
  for key in flat:
    if key.startswith('head/'):
      flat[key] = np.zeros_like(flat[key])
  return traverse_util.unflatten_dict(flat, sep='/')


def _is_group_norm(key):
  return key.split('/')[-2:-1] in (['gn_root'], ['gn1'], ['gn2'], ['gn3'], ['gn_proj'])


def _write_npz(path, flat):
  np.savez(path, **flat)
  return str(path)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


# ---------------------------------------------------------------------------------------------
# load / save_npz


def test_save_load_round_trip_is_exact_with_sharded_and_bfloat16_arrays(tmp_path):
  flat = _random_flat(_config())
  params = traverse_util.unflatten_dict(flat, sep='/')
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
  sharded = jax.device_put(flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'], sharding)
  assert len(sharded.sharding.device_set) == 8
  params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'] = sharded
  params['cls'] = jnp.asarray(flat['cls'], jnp.bfloat16)

  path = checkpoint.save_npz(params, str(tmp_path / 'sub' / 'ckpt.npz'))

  assert os.listdir(tmp_path / 'sub') == ['ckpt.npz']  # No temporary file left behind.
  with np.load(path) as raw:
    assert sorted(raw.files) == sorted(flat)
    assert all(raw[k].dtype == np.float32 for k in raw.files)
  loaded = _flat(checkpoint.load(path))
  flat['cls'] = np.asarray(jnp.asarray(flat['cls'], jnp.bfloat16), np.float32)
  assert loaded.keys() == flat.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_save_overwrites_an_existing_file(tmp_path):
  path = str(tmp_path / 'ckpt.npz')
  checkpoint.save_npz({'a': np.ones(2)}, path)
  checkpoint.save_npz({'b': {'c': np.zeros(3)}}, path)
  assert _flat(checkpoint.load(path)).keys() == {'b/c'}


def test_write_atomically_keeps_the_old_file_when_a_write_fails(tmp_path):
  path = str(tmp_path / 'sub' / 'plan.json')
  checkpoint.write_atomically(path, 'old')

  class Unwritable:  # Its write fails, as one does on a full disk.
    pass
  with pytest.raises(TypeError):
    checkpoint.write_atomically(path, Unwritable())
  with open(path) as f:
    assert f.read() == 'old'
  assert os.listdir(tmp_path / 'sub') == ['plan.json']  # No temporary file left behind.
  checkpoint.write_atomically(path, b'new')
  with open(path) as f:
    assert f.read() == 'new'


def test_write_atomically_to_a_local_path_does_not_import_tensorflow(tmp_path):
  code = ('import sys; from vit_jax import checkpoint; '
          f'checkpoint.write_atomically({str(tmp_path / "a.json")!r}, "{{}}"); '
          "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'")
  subprocess.run([sys.executable, '-c', code], check=True)


_TO_BIG_VISION = {'LayerNorm_0': 'LayerNorm_0', 'MultiHeadDotProductAttention_1':
                  'MultiHeadDotProductAttention_0', 'LayerNorm_2': 'LayerNorm_1',
                  'MlpBlock_3': 'MlpBlock_0'}


def _to_big_vision(flat, num_layers, *, scanned, prefix):
  """The big_vision layout written out from its description."""
  out = {}
  blocks = {}
  for key, value in flat.items():
    parts = key.split('/')
    if key == POSEMB:
      out['pos_embedding'] = value[:, 1:] if 'cls' in flat else value
    elif parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      sub = '/'.join([_TO_BIG_VISION[parts[2]]] + parts[3:])
      if scanned:
        blocks.setdefault(sub, [None] * num_layers)[int(parts[1].split('_')[1])] = value
      else:
        out[f'Transformer/{parts[1]}/{sub}'] = value
    else:
      out[key] = value
  for sub, layers in blocks.items():
    out[f'Transformer/encoderblock/{sub}'] = np.stack(layers)
  if prefix:
    out = {f'params/{k}': v for k, v in out.items()}
    out['opt/state/mu'] = np.zeros(3, np.float32)
  return out


@pytest.mark.parametrize('classifier,scanned,prefix', [
    ('token', True, True), ('gap', False, False), ('token', False, True)])
def test_big_vision_layout_loads_as_released_layout(tmp_path, classifier, scanned, prefix):
  flat = _random_flat(_config(classifier=classifier))
  if classifier == 'token':
    flat[POSEMB][:, 0] = 0.0  # big_vision adds no position embedding to the class token.
  big_vision = _to_big_vision(flat, 2, scanned=scanned, prefix=prefix)
  scanned_key = ('params/' if prefix else '') + 'Transformer/encoderblock/MlpBlock_0/Dense_0/kernel'
  assert (scanned_key in big_vision) == scanned

  loaded = _flat(checkpoint.load(_write_npz(tmp_path / 'bv.npz', big_vision)))

  assert loaded.keys() == flat.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_missing_file_is_named(tmp_path):
  path = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    checkpoint.load(path)


def test_truncated_and_non_npz_files_are_value_errors_naming_the_file(tmp_path):
  buffer = io.BytesIO()
  np.savez(buffer, **_random_flat(_config()))
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  with pytest.raises(ValueError, match='truncated.npz.*(truncated|not a valid)'):
    checkpoint.load(str(truncated))
  text = tmp_path / 'notes.npz'
  text.write_text('not an archive')
  with pytest.raises(ValueError, match='notes.npz is not an .npz archive'):
    checkpoint.load(str(text))


_UNPICKLED = []


class _Tripwire:
  """Records being unpickled."""

  def __setstate__(self, state):
    _UNPICKLED.append(state)


def test_pickled_arrays_are_refused_naming_file_and_key(tmp_path):
  tripwire = _Tripwire()
  tripwire.x = 1
  path = tmp_path / 'evil.npz'
  np.savez(path, fine=np.ones(2, np.float32), evil=np.array([tripwire], dtype=object))
  with pytest.raises(ValueError, match=r"evil.npz: key 'evil' holds a pickled object array"):
    checkpoint.load(str(path))
  assert not _UNPICKLED


# ---------------------------------------------------------------------------------------------
# Position-embedding resizing


def _grid_and_posemb(size, hidden, class_token, seed=0):
  rng = np.random.default_rng(seed)
  grid = rng.normal(size=(size, size, hidden)).astype(np.float32)
  cls_row = rng.normal(size=(1, 1, hidden)).astype(np.float32)
  posemb = grid.reshape(1, size * size, hidden)
  if class_token:
    posemb = np.concatenate([cls_row, posemb], axis=1)
  return grid, cls_row, posemb


@pytest.mark.parametrize('old,new', [(2, 4), (4, 3), (3, 5), (7, 12), (12, 16), (14, 24), (24, 14),
                                     (16, 37)])
@pytest.mark.parametrize('class_token', [True, False])
def test_resize_posemb_equals_scipy_zoom(old, new, class_token):
  # Bit for bit: the official code's zoom on float32 (a hand-written interpolation differed by
  # an ulp in a few entries, e.g. 56 of 16 -> 37's).
  grid, cls_row, posemb = _grid_and_posemb(old, 6, class_token)
  resized = checkpoint.resize_posemb(posemb, new * new + class_token, has_class_token=class_token)
  expected = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  assert resized.shape == (1, new * new + class_token, 6)
  assert resized.dtype == np.float32
  if class_token:
    np.testing.assert_array_equal(resized[:, :1], cls_row)
  np.testing.assert_array_equal(resized[0, class_token:].reshape(new, new, 6), expected)


def test_resize_posemb_of_two_by_two_by_hand():
  posemb = np.array([[[0.0], [3.0], [6.0], [9.0]]], np.float32)  # grid [[0, 3], [6, 9]]
  resized = checkpoint.resize_posemb(posemb, 9, has_class_token=False)
  np.testing.assert_array_equal(resized.reshape(3, 3), [[0, 1.5, 3], [3, 4.5, 6], [6, 7.5, 9]])


def test_resize_posemb_keeps_the_last_row_where_zoom_constant_mode_zeroes_it():
  # 8 -> 26: 25 * (7 / 25) rounds to 7.000000000000001, just outside the grid, so zoom's default
  # mode='constant' returns 0 for the last row and column; the edge must stay the input's edge.
  grid, _, posemb = _grid_and_posemb(8, 4, False)
  resized = checkpoint.resize_posemb(posemb, 26 * 26, has_class_token=False)[0].reshape(26, 26, 4)
  np.testing.assert_array_equal(resized[[0, 0, -1, -1], [0, -1, 0, -1]],
                                grid[[0, 0, -1, -1], [0, -1, 0, -1]])
  expected = scipy.ndimage.zoom(grid, (26 / 8, 26 / 8, 1), order=1, mode='nearest')
  np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-6)


def test_non_square_grid_is_a_clear_error():
  posemb = np.zeros((1, 1 + 6, 4), np.float32)
  with pytest.raises(ValueError, match='checkpoint position embedding has 6 patch tokens.*square'):
    checkpoint.resize_posemb(posemb, 1 + 16, has_class_token=True)
  with pytest.raises(ValueError, match='model position embedding has 8 patch tokens'):
    checkpoint.resize_posemb(np.zeros((1, 4, 4)), 8, has_class_token=False)


# ---------------------------------------------------------------------------------------------
# load_pretrained


def test_head_is_replaced_and_pre_logits_dropped_or_kept(tmp_path):
  pretrained = _config(representation_size=16)
  flat = _random_flat(pretrained, num_classes=11)
  path = _write_npz(tmp_path / 'i21k.npz', flat)

  for representation_size in (None, 16):
    config = _config(representation_size=representation_size)
    init = _init_params(config, 3, 32)
    params = _flat(checkpoint.load_pretrained(
        pretrained_path=path, init_params=init, model_config=config))
    assert params.keys() == _flat(init).keys()
    assert params['head/kernel'].shape == (16, 3)
    np.testing.assert_array_equal(params['head/kernel'], 0.0)
    assert ('pre_logits/kernel' in params) == (representation_size is not None)
    for key, value in params.items():
      if not key.startswith('head/'):
        np.testing.assert_array_equal(value, flat[key], err_msg=key)


def test_keep_head_takes_the_checkpoint_head_into_abstract_params(tmp_path):
  config = _config()
  flat = _random_flat(config, num_classes=11)
  path = _write_npz(tmp_path / 'finetuned.npz', flat)
  model = models.build_model(config, 11)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params']
  params = _flat(checkpoint.load_pretrained(pretrained_path=path, init_params=abstract,
                                            model_config=config, keep_head=True))
  assert params.keys() == flat.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(params[key], value, err_msg=key)
  with pytest.raises(ValueError, match=r'shape mismatch: head/kernel: checkpoint \(16, 11\) vs '
                     r'model \(16, 3\)'):
    checkpoint.load_pretrained(pretrained_path=path, init_params=_init_params(config, 3, 32),
                               model_config=config, keep_head=True)


def test_pre_logits_mismatches_are_errors(tmp_path):
  no_pre_logits = _write_npz(tmp_path / 'augreg.npz', _random_flat(_config()))
  config = _config(representation_size=24)
  init = _init_params(config, 3, 32)
  with pytest.raises(ValueError, match=r'(?s)augreg.npz.*missing from checkpoint: '
                     r'pre_logits/kernel \(model \(16, 24\)\).*representation_size=None'):
    checkpoint.load_pretrained(pretrained_path=no_pre_logits, init_params=init,
                               model_config=config)
  with_16 = _write_npz(tmp_path / 'i21k.npz', _random_flat(_config(representation_size=16)))
  with pytest.raises(ValueError, match=r'(?s)shape mismatch: pre_logits/kernel: '
                     r'checkpoint \(16, 16\) vs model \(16, 24\).*has size 16'):
    checkpoint.load_pretrained(pretrained_path=with_16, init_params=init, model_config=config)


def test_every_missing_unexpected_and_misshaped_key_is_listed(tmp_path):
  config = _config()
  flat = _random_flat(config)
  del flat['Transformer/encoder_norm/bias']
  flat['Transformer/extra/kernel'] = np.zeros((2, 3), np.float32)
  flat['embedding/bias'] = np.zeros(17, np.float32)
  path = _write_npz(tmp_path / 'broken.npz', flat)
  with pytest.raises(ValueError) as error:
    checkpoint.load_pretrained(pretrained_path=path, init_params=_init_params(config, 10, 32),
                               model_config=config)
  message = str(error.value)
  assert 'broken.npz' in message
  assert 'missing from checkpoint: Transformer/encoder_norm/bias (model (16,))' in message
  assert 'unexpected in checkpoint: Transformer/extra/kernel (2, 3)' in message
  assert 'shape mismatch: embedding/bias: checkpoint (17,) vs model (16,)' in message


def test_wrong_width_checkpoint_is_refused(tmp_path):
  path = _write_npz(tmp_path / 'wide.npz', _random_flat(_config(hidden_size=32)))
  config = _config()
  with pytest.raises(ValueError) as error:
    checkpoint.load_pretrained(pretrained_path=path, init_params=_init_params(config, 10, 64),
                               model_config=config)
  message = str(error.value)
  assert 'wide.npz' in message
  assert f'shape mismatch: {POSEMB}: checkpoint (1, 5, 32) vs model (1, 17, 16)' in message
  assert 'shape mismatch: embedding/kernel: checkpoint (16, 16, 3, 32) vs model' in message


def test_legacy_group_norm_shapes_are_squeezed(tmp_path):
  config = _hybrid_config()
  flat = _random_flat(config, resolution=32)
  group_norm = [k for k in flat if _is_group_norm(k)]
  assert len(group_norm) == 10  # gn_root + gn1, gn2, gn3, gn_proj of one unit, scale and bias.
  legacy = {k: v.reshape(1, 1, 1, -1) if k in group_norm else v for k, v in flat.items()}
  path = _write_npz(tmp_path / 'old_hybrid.npz', legacy)
  params = _flat(checkpoint.load_pretrained(
      pretrained_path=path, init_params=_init_params(config, 10, 32), model_config=config))
  for key in group_norm:
    np.testing.assert_array_equal(params[key], flat[key], err_msg=key)


def test_logits_after_load_pretrained_at_new_resolution_match_manual_interpolation(tmp_path):
  config = _config()
  flat = _random_flat(config, num_classes=11, resolution=32)  # 2x2 grid + class token
  path = _write_npz(tmp_path / 'ckpt.npz', flat)
  model = models.build_model(config, 7)
  init = _init_params(config, 7, 64)  # 4x4 grid + class token

  loaded = checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=config)

  manual = dict(flat, **{k: v for k, v in _flat(init).items() if k.startswith('head/')})
  grid = flat[POSEMB][0, 1:].reshape(2, 2, 16)
  manual[POSEMB] = np.concatenate(
      [flat[POSEMB][:, :1],
       scipy.ndimage.zoom(grid, (2, 2, 1), order=1).reshape(1, 16, 16)], axis=1)
  head = np.random.default_rng(5).normal(size=(16, 7)).astype(np.float32)
  manual['head/kernel'] = head
  loaded['head']['kernel'] = head  # A zero head would make every logit 0.
  images = np.random.default_rng(6).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  apply = jax.jit(lambda p: model.apply({'params': p}, images, train=False))
  expected = apply(traverse_util.unflatten_dict(manual, sep='/'))
  assert float(jnp.std(expected)) > 0.1
  np.testing.assert_allclose(apply(loaded), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# match_model_config


def test_match_model_config_recognises_released_trees():
  assert checkpoint.match_model_config(_shapes(_config(), 10, 32)) == ('micro', 10, 32)
  i21k = _shapes(_config(representation_size=16), 21843, 64)
  assert checkpoint.match_model_config(i21k) == ('micro', 21843, 64)
  no_head = _shapes(_config(), None, 48)
  assert checkpoint.match_model_config(no_head) == ('micro', None, 48)
  assert checkpoint.match_model_config(_shapes(_config(hidden_size=20), 10, 32)) is None
  # Without the class token the tree is no longer 'micro' (which has one).
  assert checkpoint.match_model_config(_shapes(_config(classifier='gap'), 10, 32)) is None
  odd = dict(i21k, **{POSEMB: (1, 1 + 6, 16)})
  assert checkpoint.match_model_config(odd) == ('micro', 21843, None)


def test_match_model_config_of_hybrid_with_legacy_group_norm_shapes():
  shapes = _shapes(model_configs.get_model_config('R+ViT-Ti_16'), 21843, 384)
  legacy = {k: (1, 1, 1) + s if _is_group_norm(k) else s for k, s in shapes.items()}
  assert checkpoint.match_model_config(legacy) == ('R+ViT-Ti_16', 21843, 384)


# ---------------------------------------------------------------------------------------------
# inspect CLI


def test_inspect_prints_tree_parameter_count_and_model_config(tmp_path, capsys):
  flat = _random_flat(_config(), num_classes=10, resolution=32)
  path = _write_npz(tmp_path / 'micro.npz', flat)
  weights.main(['weights', 'inspect', path])
  out = capsys.readouterr().out
  for key, value in flat.items():
    assert any(line.split()[:1] == [key] and str(value.shape) in line
               for line in out.splitlines()), key
  count = sum(math.prod(v.shape) for v in flat.values())
  assert f'Parameters: {count:,} in {len(flat)} arrays' in out
  assert 'Model config: micro (num_classes=10, resolution=32)' in out


# ---------------------------------------------------------------------------------------------
# fetch


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    pass


class _ShortReadHandler(http.server.BaseHTTPRequestHandler):
  """Announces 1000 bytes but sends 400 and closes the connection."""

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header('Content-Length', '1000')
    self.end_headers()
    self.wfile.write(b'x' * 400)

  def log_message(self, *args):
    pass


@pytest.fixture
def serve():
  servers = []

  def start(handler):
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return f'http://127.0.0.1:{server.server_address[1]}'

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def _bucket_dir(tmp_path, bucket, name):
  root = tmp_path / 'bucket'
  (root / bucket).mkdir(parents=True)
  data = io.BytesIO()
  np.savez(data, **_random_flat(_config()))
  (root / bucket / f'{name}.npz').write_bytes(data.getvalue())
  return root, data.getvalue()


def test_fetch_downloads_from_the_bucket_url(tmp_path, serve):
  root, data = _bucket_dir(tmp_path, 'imagenet21k+imagenet2012', 'R50+ViT-B_16')
  base_url = serve(functools.partial(_QuietHandler, directory=str(root)))
  dest = tmp_path / 'checkpoints'
  path = checkpoint.fetch('R50+ViT-B_16', bucket='imagenet21k+imagenet2012', dest=str(dest),
                          base_url=base_url)
  assert path == str(dest / 'R50+ViT-B_16.npz')
  assert open(path, 'rb').read() == data
  assert os.listdir(dest) == ['R50+ViT-B_16.npz']
  assert checkpoint.match_model_config(
      {k: v.shape for k, v in _flat(checkpoint.load(path)).items()}) == ('micro', 10, 32)


def test_short_read_is_detected_and_leaves_no_file(tmp_path, serve):
  base_url = serve(_ShortReadHandler)
  path = tmp_path / 'ViT-B_16.npz'
  with pytest.raises(checkpoint.DownloadError, match='received 400 of 1000 bytes'):
    checkpoint.download(f'{base_url}/imagenet21k/ViT-B_16.npz', str(path))
  assert not os.listdir(tmp_path)


def test_unknown_names_and_buckets_are_listed():
  with pytest.raises(ValueError, match=r"Unknown checkpoint 'ViT-B_99' in bucket imagenet21k; "
                     r'known names: ViT-B_16, ViT-B_32'):
    checkpoint.fetch('ViT-B_99', dest='/nonexistent')
  with pytest.raises(ValueError, match="Unknown bucket 'jft'"):
    checkpoint.checkpoint_url('ViT-B_16', 'jft')
  assert checkpoint.checkpoint_url('ViT-B_16', 'imagenet21k') == (
      'https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz')


def test_offline_fetch_fails_fast_with_manual_copy_instructions(tmp_path):
  with socket.socket() as s:  # A port with nobody listening: connection refused.
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  start = time.monotonic()
  with pytest.raises(checkpoint.DownloadError,
                     match=r'(?s)Could not download.*gsutil cp "gs://vit_models/imagenet21k/'
                     r'ViT-B_16.npz"'):
    checkpoint.fetch('ViT-B_16', dest=str(tmp_path), base_url=f'http://127.0.0.1:{port}')
  assert time.monotonic() - start < 10
  assert not os.listdir(tmp_path)


def test_fetch_command_line(tmp_path, serve):
  root, data = _bucket_dir(tmp_path, 'imagenet21k', 'ViT-B_16')
  base_url = serve(functools.partial(_QuietHandler, directory=str(root)))
  flag_values = flags.FlagValues()
  weights.define_flags(flag_values)
  dest = tmp_path / 'out'
  argv = flag_values(['weights', 'fetch', 'ViT-B_16', f'--dest={dest}',
                      f'--base_url={base_url}'])
  weights.main(argv, flag_values)
  assert (dest / 'ViT-B_16.npz').read_bytes() == data
  argv = flag_values(['weights', 'fetch', 'ViT-X_1', '--bucket=imagenet21k+imagenet2012'])
  with pytest.raises(ValueError, match="Unknown checkpoint 'ViT-X_1' in bucket "
                     r'imagenet21k\+imagenet2012'):
    weights.main(argv, flag_values)

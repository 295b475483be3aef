"""predict and report commands, and the shared checkpoint / image loading of vit_jax.inference."""
import json
import math
import os
import re

import ml_collections
import numpy as np
import pytest

from tests.test_analysis import assert_png
from tests.test_analysis import parse_flags
from tests.test_analysis import write_image_folder
from tests.test_analysis import write_npz
from tests.test_analysis import write_workdir
from vit_jax import fashion_mnist
from vit_jax import inference
from vit_jax import model_configs
from vit_jax import predict
from vit_jax import report

HEAD_BIAS = (0.0, 2.0, 1.0)
# softmax(HEAD_BIAS) by hand: e^b / (1 + e + e^2), with 1 + e + e^2 = 11.107337.
PROBABILITIES = (1 / 11.107337, math.e**2 / 11.107337, math.e / 11.107337)


def _images(tmp_path):
  """Two image files: a red one and a green one (see write_image_folder)."""
  folder = write_image_folder(tmp_path / 'images')
  return [os.path.join(folder, 'class0', '0.png'), os.path.join(folder, 'class1', '0.png')]


# ---------------------------------------------------------------------------------------------
# vit_jax.inference


def test_load_model_keeps_the_checkpoint_head_and_reads_its_resolution(tmp_path):
  npz = write_npz(tmp_path, resolution=32, head_bias=HEAD_BIAS)
  loaded = inference.load_model(npz, model_name='micro')
  assert loaded.resolution == 32 and loaded.grid == (2, 2) and loaded.num_classes == 3
  np.testing.assert_array_equal(loaded.params['head']['bias'], HEAD_BIAS)
  resized = inference.load_model(npz, model_name='micro', resolution=48)
  assert resized.grid == (3, 3)
  posemb = resized.params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 9, 16)
  np.testing.assert_array_equal(  # The class token's embedding is kept as is.
      posemb[0, 0], loaded.params['Transformer']['posembed_input']['pos_embedding'][0, 0])


def test_load_model_reads_the_checkpoint_file_once(tmp_path, monkeypatch):
  npz = write_npz(tmp_path, resolution=32, head_bias=HEAD_BIAS)
  opened = []
  real_open = inference.checkpoint.gfile().GFile
  monkeypatch.setattr(inference.checkpoint.gfile(), 'GFile',
                      lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
  loaded = inference.load_model(npz, model_name='micro')
  assert opened == [npz]
  np.testing.assert_array_equal(loaded.params['head']['bias'], HEAD_BIAS)
  assert loaded.pp is None  # An .npz carries no preprocessing config; a workdir does (below).


def test_load_model_reads_a_workdir_as_the_plain_model(tmp_path):
  workdir = write_workdir(tmp_path)
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path) as f:
    run_config = json.load(f)
  run_config['model'].update(attention_impl='fused', scan_layers=True, remat_policy='full')
  with open(config_path, 'w') as f:
    json.dump(run_config, f)
  loaded = inference.load_model(workdir)
  assert loaded.name == 'micro' and loaded.resolution == 16 and loaded.grid == (4, 4)
  assert loaded.run_config.dataset.startswith('folder:')
  assert loaded.pp.resolution == 16 and loaded.pp == loaded.run_config.pp
  assert loaded.model.attention_impl == 'xla' and not loaded.model.scan_layers
  assert loaded.model.remat_policy == 'none'


def test_load_model_errors(tmp_path):
  npz = write_npz(tmp_path)
  with pytest.raises(ValueError, match='pass the model name'):
    inference.load_model(npz)
  with pytest.raises(ValueError, match=r'does not fit.*ViT-S_16'):
    inference.load_model(npz, model_name='ViT-S_16')
  with pytest.raises(ValueError, match='not a multiple of 16'):
    inference.load_model(npz, model_name='micro', resolution=40)
  with pytest.raises(ValueError, match='neither a .npz file nor a training workdir'):
    inference.load_model(str(tmp_path / 'model.ckpt'), model_name='micro')
  workdir = write_workdir(tmp_path)
  os.remove(os.path.join(workdir, 'model.npz'))
  with pytest.raises(FileNotFoundError, match='has no model.npz'):
    inference.load_model(workdir)


def test_load_images_scales_to_minus_one_one_and_names_bad_files(tmp_path):
  folder = write_image_folder(tmp_path / 'images')
  files, images = inference.load_images([os.path.join(folder, 'class2')], 8)
  assert len(files) == 12 and images.shape == (12, 8, 8, 3)
  # Class 2 is blue, (30, 30, 220) + noise: red about 30 / 127.5 - 1 = -0.76, blue about 0.73.
  assert abs(images[..., 0].mean() + 0.76) < 0.05 and abs(images[..., 2].mean() - 0.73) < 0.05
  (tmp_path / 'notes.png').write_bytes(b'\x89PNG but truncated')
  with pytest.raises(ValueError, match='Cannot decode image file .*notes.png'):
    inference.load_images([str(tmp_path / 'notes.png')], 8)
  with pytest.raises(FileNotFoundError, match='missing.png'):
    inference.load_images([str(tmp_path / 'missing.png')], 8)


def test_map_batches_pads_the_last_batch_to_one_shape():
  shapes = []

  def double(batch):
    shapes.append(batch.shape)
    return batch * 2

  out = inference.map_batches(double, np.arange(5.0)[:, None], batch_size=2)
  np.testing.assert_array_equal(out[:, 0], [0, 2, 4, 6, 8])
  assert shapes == [(2, 1)] * 3


# ---------------------------------------------------------------------------------------------
# predict


def test_predict_prints_top_k_softmax_with_label_names(tmp_path):
  npz = write_npz(tmp_path, head_bias=HEAD_BIAS)
  labels = tmp_path / 'labels.txt'
  labels.write_text('cat\ndog\nbird\n')
  images = _images(tmp_path)
  out = predict.run(parse_flags(predict.define_flags, [
      f'--checkpoint={npz}', '--model=micro', f'--images={",".join(images)}',
      f'--labels={labels}', '--top_k=2']))
  p = PROBABILITIES
  assert out.splitlines() == [images[0], f'  {p[1]:.4f}  dog', f'  {p[2]:.4f}  bird',
                              images[1], f'  {p[1]:.4f}  dog', f'  {p[2]:.4f}  bird']


def test_predict_at_another_resolution_defaults_to_class_indices(tmp_path):
  workdir = write_workdir(tmp_path, head_bias=HEAD_BIAS)
  out = predict.run(parse_flags(predict.define_flags, [
      f'--checkpoint={workdir}', f'--images={_images(tmp_path)[0]}', '--resolution=24']))
  p = PROBABILITIES
  assert out.splitlines()[1:] == [f'  {p[1]:.4f}  1', f'  {p[2]:.4f}  2', f'  {p[0]:.4f}  0']


def test_shipped_fashion_mnist_labels_are_used_for_its_runs():
  loaded = inference.LoadedModel(
      model_config=ml_collections.ConfigDict(), params={}, resolution=28, num_classes=10,
      source='workdir', run_config=ml_collections.ConfigDict({'dataset': 'fashion_mnist'}))
  assert inference.class_names(loaded, None) == list(fashion_mnist.CLASS_NAMES)


def test_labels_file_must_match_the_head(tmp_path):
  npz = write_npz(tmp_path)
  labels = tmp_path / 'labels.txt'
  labels.write_text('cat\ndog\n')
  with pytest.raises(ValueError, match='has 2 names but the model has 3 classes'):
    inference.class_names(inference.load_model(npz, model_name='micro'), str(labels))


def test_top_k_orders_by_probability():
  probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
  np.testing.assert_array_equal(inference.top_k(probs, 2), [[1, 2], [0, 2]])


# ---------------------------------------------------------------------------------------------
# report


def test_paper_params_of_table_1():
  assert [report.paper_params_m(n) for n in ('ViT-B_16', 'ViT-L_32', 'ViT-H_14')] == [86, 307,
                                                                                     632]
  assert report.paper_params_m('R50+ViT-B_16') is None
  assert report.paper_params_m('micro') is None


def test_count_params_matches_the_known_vit_b16_count():
  config = model_configs.get_model_config('ViT-B_16')
  assert report.count_params(config, 1000, 224) == 86_567_656


def test_run_names_are_unique():
  assert report._run_names(['a/run', 'b/run/', 'c/other', 'd/run']) == [
      'run', 'run_2', 'other', 'run_3']


def test_report_has_the_tables_curves_and_analyses(tmp_path, monkeypatch):
  # Tracing ViT-L and ViT-H for their parameter counts takes seconds; test_models checks those.
  monkeypatch.setattr(report, 'TABLE1_MODELS', ('ViT-B_16',))
  workdir = write_workdir(tmp_path, metrics=[
      {'step': 10, 'loss': 1.2}, {'step': 20, 'loss': 0.9, 'eval_top1': 0.5},
      {'step': 30, 'loss': 0.7}, {'step': 40, 'loss': 0.5, 'eval_top1': 0.75}])
  out = tmp_path / 'shared' / 'report.md'
  report.write_report(parse_flags(report.define_flags, [
      f'--workdir={workdir}', f'--out={out}', '--num_images=4', '--num_attention_maps=2',
      '--shots=1,5',
      '--analyses=posemb_similarity,filters,attention_distance,attention_maps,fewshot']))
  text = out.read_text()
  assert '| ViT-B_16 | 12 | 768 | 3072 | 12 | 86.6M | 86M |' in text
  run_row = next(line for line in text.splitlines() if line.startswith('| workdir |'))
  assert '| micro | folder:' in run_row and '| 16 |' in run_row
  assert run_row.endswith('| 40 | 0.5000 | 75.00% | 75.00% |')
  assert re.search(r'\| 5 \| \d+\.\d\d% ± \d+\.\d\d% \|', text)  # Few-shot table.
  links = re.findall(r'!\[[^]]*\]\(([^)]+)\)', text)
  assert [os.path.basename(link) for link in links] == [
      'training_curves.png', 'posemb_similarity.png', 'filters.png', 'attention_distance.png',
      'attention_map_000_test_00000.png', 'attention_map_001_test_00001.png']
  for link in links:
    assert not os.path.isabs(link)
    assert_png(os.path.join(out.parent, link))

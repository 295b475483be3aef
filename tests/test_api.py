"""The notebook API: vit_jax.load / vit_jax.classify, and `import vit_jax` staying light."""
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import vit_jax
from tests.test_analysis import write_npz
from tests.test_analysis import write_workdir
from tests.test_predict_report import HEAD_BIAS
from tests.test_predict_report import PROBABILITIES
from vit_jax import api
from vit_jax import checkpoint
from vit_jax import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_vit_jax_loads_neither_jax_nor_tensorflow():
  code = 'import sys, vit_jax; print(sorted({"jax", "tensorflow"} & set(sys.modules)))'
  out = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == '[]'


def test_load_a_workdir_unpacks_to_model_params_preprocess(tmp_path):
  workdir = write_workdir(tmp_path, head_bias=HEAD_BIAS)
  model, params, preprocess = vit_jax.load(workdir)
  path = tmp_path / 'images' / 'class0' / '0.png'
  x = preprocess(str(path))
  with Image.open(path) as image:  # The eval pipeline's: tf.image.resize to 16px, then [-1, 1].
    pixels = np.asarray(image.convert('RGB'), np.float32)
  expected = tf.image.resize(pixels, (16, 16)).numpy() / 127.5 - 1
  np.testing.assert_allclose(x[0], expected, atol=1e-6)
  logits = np.asarray(model.apply({'params': params}, x, train=False))
  np.testing.assert_allclose(logits[0], HEAD_BIAS, atol=1e-6)  # Zero head kernel: the bias.


def test_classify_names_the_classes_in_probability_order(tmp_path):
  npz = write_npz(tmp_path, head_bias=HEAD_BIAS)
  labels = tmp_path / 'labels.txt'
  labels.write_text('cat\ndog\nbird\n')
  model = vit_jax.load(npz, model_name='micro', labels=str(labels))
  folder = tmp_path / 'images'
  os.makedirs(folder)
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / 'a.png')
  Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(folder / 'b.png')
  result = vit_jax.classify(model, [str(folder)], top_k=2)
  p = PROBABILITIES
  assert [[name for name, _ in r] for r in result] == [['dog', 'bird']] * 2
  np.testing.assert_allclose([[q for _, q in r] for r in result], [[p[1], p[2]]] * 2, rtol=1e-5)


def test_all_zero_head_warns_that_predictions_are_uniform(tmp_path, caplog):
  model = vit_jax.load(write_workdir(tmp_path))
  assert 'predictions are uniform over the 3 classes' in caplog.text
  assert 'fine-tune it first' in caplog.text
  probs = [q for _, q in vit_jax.classify(model, np.zeros((1, 16, 16, 3), np.float32))[0]]
  np.testing.assert_allclose(probs, [1 / 3] * 3, rtol=1e-6)


def test_a_released_name_is_fetched_into_checkpoints(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(checkpoint, 'fetch', lambda name, **kw: calls.append((name, kw)) or
                      os.path.join(kw['dest'], f'{name}.npz'))
  assert api.resolve('b16', checkpoints_dir=str(tmp_path)) == (
      str(tmp_path / 'ViT-B_16.npz'), 'ViT-B_16')
  assert calls == [('ViT-B_16', {'bucket': 'imagenet21k', 'dest': str(tmp_path)})]
  assert api.resolve('some/dir/ViT-L_16.npz') == ('some/dir/ViT-L_16.npz', 'ViT-L_16')
  with pytest.raises(ValueError, match="Unknown model 'ViT-Q_9'"):
    api.resolve('ViT-Q_9')


def test_the_readme_example_runs_on_a_demo_like_workdir(tmp_path, capsys):
  readme = open(os.path.join(ROOT, 'README.md')).read()
  code = re.search(r'```python\n(import vit_jax\n.*?)```', readme, re.S).group(1)
  workdir = write_workdir(tmp_path, head_bias=HEAD_BIAS)
  image = str(tmp_path / 'images' / 'class1' / '0.png')
  code = code.replace('/tmp/vit_demo/finetune', workdir).replace('photo.png', image)
  exec(compile(code, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out  # A folder dataset: its class indices name the classes.
  assert f"[[('1', {PROBABILITIES[1]:.3f}" in re.sub(r'(\d\.\d{3})\d+', r'\1', out)


def test_imagenet_class_names_ship_in_class_index_order():
  loaded = inference.LoadedModel(model_config=ml_collections.ConfigDict(), params={},
                                 resolution=384, num_classes=1000, source='ViT-B_16.npz')
  names = inference.class_names(loaded, None)
  assert len(names) == 1000 and len(set(names)) == 999  # 'crane' the bird and the machine.
  # Well-known indices of ImageNet-1k (the order of TFDS' imagenet2012 label feature).
  assert names[0] == 'tench, Tinca tinca' and names[1] == 'goldfish, Carassius auratus'
  assert names[207] == 'golden retriever' and names[281] == 'tabby, tabby cat'
  assert names[134] == names[517] == 'crane'
  assert names[999] == 'toilet tissue, toilet paper, bathroom tissue'

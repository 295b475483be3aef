"""Tiny TFDS datasets that are not prepared yet, for tests/test_datasets.py.

Importing this module registers three builders: one whose download fails (an unreachable
URL, as on a machine without a network), one that needs files put in a manual dir (as
imagenet2012) and one that generates its examples (prepared offline on first use).
"""
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

# TFDS retries a refused connection with exponential back-off for minutes; the test needs the
# failure, not the wait.
downloader.MAX_RETRIES = 0

UNREACHABLE_URL = 'http://127.0.0.1:9/unprepared_test/images.tar'  # Port 9: discard, closed.
NUM_EXAMPLES = 16


class _TinyImages(tfds.core.GeneratorBasedBuilder):
  """8x8 images of 2 classes."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(num_classes=2)}))

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {'image': np.full((8, 8, 3), 10 * i, np.uint8), 'label': i % 2}


class UnpreparedDownloadTest(_TinyImages):

  def _split_generators(self, dl_manager):
    dl_manager.download(UNREACHABLE_URL)
    return {'train': self._generate_examples(NUM_EXAMPLES)}


class UnpreparedManualTest(_TinyImages):
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put images.tar (from example.org) in the manual dir.'

  def _split_generators(self, dl_manager):
    dl_manager.manual_dir.joinpath('images.tar').read_bytes()
    return {'train': self._generate_examples(NUM_EXAMPLES)}


class UnpreparedGeneratedTest(_TinyImages):

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(NUM_EXAMPLES),
            'test': self._generate_examples(NUM_EXAMPLES // 2)}

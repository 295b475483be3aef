"""Writes vit_jax/labels/imagenet2012.txt: ImageNet-1k class names in class-index order.

    apt-get install wordnet-base && python scripts/make_imagenet_labels.py

The class order is TFDS' imagenet2012 `label` feature (its labels.txt of WordNet ids, sorted);
each id n<offset> is a WordNet 3.0 noun synset, named here by its lemmas ("tench, Tinca tinca").
"""
import os

import tensorflow_datasets as tfds

WORDNET_NOUNS = '/usr/share/wordnet/data.noun'
OUT = os.path.join(os.path.dirname(__file__), '..', 'vit_jax', 'labels', 'imagenet2012.txt')


def synset_lemmas(path: str) -> dict:
  """{'n01440764': 'tench, Tinca tinca', ...} from a WordNet data.noun file."""
  names = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.startswith(' '):  # The licence header.
        continue
      fields = line.split()
      count = int(fields[3], 16)
      names['n' + fields[0]] = ', '.join(w.replace('_', ' ') for w in fields[4:4 + 2 * count:2])
  return names


def main():
  wnids = tfds.builder('imagenet2012').info.features['label'].names
  names = synset_lemmas(WORDNET_NOUNS)
  with open(OUT, 'w', encoding='utf-8') as f:
    f.write(''.join(names[wnid] + '\n' for wnid in wnids))


if __name__ == '__main__':
  main()

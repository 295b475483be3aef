r"""Classifies image files with a trained model; prints the top-k classes of each image.

  python -m vit_jax.predict --checkpoint=WORKDIR --images=photo.jpg,more_photos/
  python -m vit_jax.predict --model=ViT-B_16 --checkpoint=ViT-B_16.npz --images=DIR \
      --labels=names.txt --top_k=5 --resolution=384

Class names: --labels (one per line, in class-index order), else the shipped list of the
workdir's dataset when there is one (vit_jax/labels/), else ImageNet-1k's for a 1000-class
`.npz` (the released fine-tuned checkpoints), else the class indices.
"""
from typing import Sequence

from absl import flags

from vit_jax import cli
from vit_jax import inference


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defined by the program only, so that importing this module adds no flags elsewhere."""
  flags.DEFINE_string('checkpoint', None, 'A released-layout .npz or a training workdir.',
                      flag_values=fv)
  flags.DEFINE_string('model', None, 'Model name (vit_jax.model_configs); needed for a .npz.',
                      flag_values=fv)
  flags.DEFINE_list('images', None, 'Image files and/or directories (searched recursively).',
                    flag_values=fv)
  flags.DEFINE_string('labels', None, 'Text file of class names, one per line.', flag_values=fv)
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.', lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('resolution', None, 'Input resolution (default: the checkpoint\'s); '
                       'position embeddings are resized to fit.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.', lower_bound=1,
                       flag_values=fv)
  flags.mark_flags_as_required(['checkpoint', 'images'], flag_values=fv)


def run(fv: flags.FlagValues) -> str:
  """Each image file's name, then its `top_k` classes: probability and name."""
  loaded = inference.load_model(fv.checkpoint, model_name=fv.model, resolution=fv.resolution)
  labels = inference.class_names(loaded, fv.labels)
  inference.check_head(loaded)
  names, images = inference.load_images(fv.images, loaded.resolution, loaded.pp)
  probs = inference.probabilities(loaded, images, fv.batch_size)
  lines = []
  for name, row, best in zip(names, probs, inference.top_k(probs, fv.top_k)):
    lines.append(name)
    lines.extend(f'  {row[c]:.4f}  {labels[c]}' for c in best)
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  cli.check_no_arguments(argv)
  print(run(flags.FLAGS))


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""Examples of a dataset config's split for the analyses, with eval preprocessing, in one pass."""
from typing import Iterator, Optional, Sequence

import ml_collections
import numpy as np

from vit_jax import inference
from vit_jax import input_pipeline


def batches(config: ml_collections.ConfigDict, split: str,
            max_examples: Optional[int] = None) -> Iterator[dict]:
  """{'image', 'label', 'mask'} batches of `config.batch_eval` (fixed shape, padding masked) over
  `split` at `config.pp.resolution`, stopping after `max_examples` unmasked examples."""
  config = config.copy_and_resolve_references()
  config.eval_split = split
  seen = 0
  for batch in input_pipeline.build_eval_iterator(config, process_index=0, process_count=1):
    if max_examples is not None:
      batch['mask'] = batch['mask'] & (np.cumsum(batch['mask']) <= max_examples - seen)
    seen += int(batch['mask'].sum())
    yield batch
    if max_examples is not None and seen >= max_examples:
      return


def analysis_images(resolution: int, image_paths: Sequence[str],
                    config: Optional[ml_collections.ConfigDict],
                    count: int) -> tuple[list[str], np.ndarray]:
  """(names, images), at most `count`, to analyse: the given image files/directories if any, else
  the first of the dataset config's eval split; at `resolution`, with its eval preprocessing."""
  if image_paths:
    names, found = inference.load_images(image_paths, resolution, config.pp if config else None)
    return names[:count], found[:count]
  if config is None:
    raise ValueError('Give images (--images) or a dataset config (--config, or a workdir as the '
                     'checkpoint) to take them from.')
  config = config.copy_and_resolve_references()
  config.pp.resolution = resolution
  kept = [b['image'][b['mask']] for b in batches(config, config.eval_split, count)]
  if not kept:
    raise ValueError(f'Split {config.eval_split!r} of {config.dataset} has no examples.')
  found = np.concatenate(kept)
  return [f'{config.eval_split}_{i:05d}' for i in range(len(found))], found

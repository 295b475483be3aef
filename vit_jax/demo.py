"""The paper's protocol in miniature on Fashion-MNIST, offline: pre-train, export, fine-tune.

    python -m vit_jax.demo --workdir=/tmp/vit_demo

1. pre-trains `configs/demo.py:pretrain` at 21x21 into WORKDIR/pretrain (-> model.npz);
2. fine-tunes `configs/demo.py:finetune` at 28x28 from that model.npz into WORKDIR/finetune,
   through `vit_jax.checkpoint.load_pretrained` exactly as with released weights;
3. prints the minival (2% of train) and test-set top-1 of both stages.
Re-running resumes whatever was interrupted.
"""
import os
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax import cli
from vit_jax import logging_util
from vit_jax import train_loop
from vit_jax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/vit_demo', 'Parent of pretrain/ and finetune/.')
_PRETRAIN = config_flags.DEFINE_config_file(
    'pretrain_config', 'configs/demo.py:pretrain', 'Pre-training config.', lock_config=False)
_FINETUNE = config_flags.DEFINE_config_file(
    'finetune_config', 'configs/demo.py:finetune', 'Fine-tuning config.', lock_config=False)


def main(argv):
  cli.check_no_arguments(argv)
  logging_util.quiet_libraries()
  pretrain_dir = os.path.join(_WORKDIR.value, 'pretrain')
  _FINETUNE.value.pretrained_path = workdir_lib.path(pretrain_dir, workdir_lib.MODEL)
  stages = ((_PRETRAIN.value, pretrain_dir, 'pre-training', 'Pre-trained'),
            (_FINETUNE.value, os.path.join(_WORKDIR.value, 'finetune'), 'fine-tuning',
             'Fine-tuned'))
  lines = []
  for i, (config, workdir, doing, done) in enumerate(stages):
    logging.info('Stage %d/2: %s at %dpx in %s', i + 1, doing, config.pp.resolution, workdir)
    start = time.perf_counter()
    metrics = train_loop.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    model = f'; model: {workdir_lib.path(workdir, workdir_lib.MODEL)}' if i else ''
    lines.append(f'{done} at {config.pp.resolution}px: minival top-1 {metrics["eval_top1"]:.2%}, '
                 f'test top-1 {metrics["test_top1"]:.2%} ({seconds:.0f} s{model})')
  print('\n'.join(lines))


if __name__ == '__main__':
  cli.run(main)

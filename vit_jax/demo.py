"""The paper's protocol in miniature on Fashion-MNIST, offline: pre-train, export, fine-tune.

    python -m vit_jax.demo --workdir=/tmp/vit_demo

1. pre-trains `configs/demo.py:pretrain` at 21x21 into WORKDIR/pretrain (-> model.npz);
2. fine-tunes `configs/demo.py:finetune` at 28x28 from that model.npz into WORKDIR/finetune,
   through `vit_jax.checkpoint.load_pretrained` exactly as with released weights;
3. prints the minival (2% of train) and test-set top-1 of both stages. Re-running resumes whatever was interrupted.
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


def run(pretrain_config, finetune_config, workdir: str) -> dict:
  pretrain_dir = os.path.join(workdir, 'pretrain')
  finetune_dir = os.path.join(workdir, 'finetune')
  logging.info('Stage 1/2: pre-training at %dpx in %s', pretrain_config.pp.resolution,
               pretrain_dir)
  start = time.perf_counter()
  pretrained = train_loop.train_and_evaluate(pretrain_config, pretrain_dir)
  middle = time.perf_counter()
  finetune_config.pretrained_path = workdir_lib.path(pretrain_dir, workdir_lib.MODEL)
  logging.info('Stage 2/2: fine-tuning at %dpx in %s', finetune_config.pp.resolution,
               finetune_dir)
  finetuned = train_loop.train_and_evaluate(finetune_config, finetune_dir)
  return {'pretrain': pretrained, 'finetune': finetuned, 'pretrain_s': middle - start,
          'finetune_s': time.perf_counter() - middle,
          'model': workdir_lib.path(finetune_dir, workdir_lib.MODEL)}


def _accuracies(metrics: dict) -> str:
  return (f'minival top-1 {metrics["eval_top1"]:.2%}, test top-1 '
          f'{metrics["test_top1"]:.2%}')


def main(argv):
  cli.check_no_arguments(argv)
  logging_util.quiet_libraries()
  results = run(_PRETRAIN.value, _FINETUNE.value, _WORKDIR.value)
  print(f'Pre-trained at {_PRETRAIN.value.pp.resolution}px: '
        f'{_accuracies(results["pretrain"])} ({results["pretrain_s"]:.0f} s)')
  print(f'Fine-tuned at {_FINETUNE.value.pp.resolution}px: '
        f'{_accuracies(results["finetune"])} ({results["finetune_s"]:.0f} s; model: '
        f'{results["model"]})')


if __name__ == '__main__':
  cli.run(main)

r"""The paper's fine-tuning protocol as one command: sweep the learning rate, pick it on minival.

    python -m vit_jax.sweep --config=configs/vit.py:b16,cifar10 \
        --base_lrs=0.001,0.003,0.01,0.03 --workdir=/tmp/b16_cifar10_sweep

Appendix B.1.1: each base learning rate is fine-tuned (one after another) into its own workdir
WORKDIR/lr_<base_lr>; the one with the best minival top-1 (`eval_top1` on config.eval_split at
the last step; a tie goes to the smaller rate) is chosen, and its `test_top1` (config.test_split,
evaluated once at the end of every run) is the result reported. The table of all runs, the chosen
rate and its test top-1 are printed and written to WORKDIR/sweep.md and WORKDIR/sweep.json.

Rerunning the command resumes the sweep: finished runs are read back from their metrics.jsonl,
an interrupted one resumes from its checkpoint. A run whose loss turns non-finite
(config.nonfinite='stop') is listed as diverged and never chosen. Any config field can be
overridden as with `vit_jax.main` (`--config.total_steps=500`); a single process only.
"""
from absl import flags
from ml_collections import config_flags

from vit_jax import cli
from vit_jax import logging_util
from vit_jax import lr_sweep

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Fine-tuning config, e.g. configs/vit.py:b16,cifar10.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Parent of the runs\' workdirs and the results.')
_BASE_LRS = flags.DEFINE_list('base_lrs', ['0.001', '0.003', '0.01', '0.03'],
                              'Base learning rates to fine-tune with (the paper\'s by default).')


def main(argv):
  cli.check_no_arguments(argv)
  logging_util.quiet_libraries()
  if _CONFIG.value is None or not _WORKDIR.value:
    raise cli.UserError('--config and --workdir are required, e.g. '
                        '--config=configs/vit.py:b16,cifar10 --workdir=/tmp/sweep.')
  config = _CONFIG.value.unlock()
  workdir = _WORKDIR.value
  lrs = lr_sweep.parse_base_lrs(_BASE_LRS.value)
  results = {lr: lr_sweep.fine_tune(config, lr, workdir) for lr in lrs}
  chosen = lr_sweep.choose(results)
  table = lr_sweep.markdown(results, chosen, config)
  lr_sweep.write_results(workdir, results, chosen, table)
  print(table, end='', flush=True)


if __name__ == '__main__':
  cli.run(main)

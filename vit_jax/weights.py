"""The command line of released `.npz` checkpoints (the library is vit_jax.checkpoint).

  python -m vit_jax.weights inspect PATH
  python -m vit_jax.weights fetch NAME [--bucket=imagenet21k] [--dest=checkpoints/]
  python -m vit_jax.weights fetch augreg:B_16    # the best i21k AugReg B/16
"""
from typing import Sequence

from absl import flags
from flax import traverse_util

from vit_jax import checkpoint
from vit_jax import cli


def describe(path: str) -> str:
  """Human-readable summary: each array with its shape, the parameter count and the config."""
  flat = traverse_util.flatten_dict(checkpoint.load(path), sep='/')
  width = max(len(k) for k in flat)
  lines = [path]
  lines += [f'  {k:<{width}}  {str(tuple(v.shape)):<20} {v.dtype}' for k, v in sorted(flat.items())]
  lines.append(f'Parameters: {sum(v.size for v in flat.values()):,} in {len(flat)} arrays')
  match = checkpoint.match_model_config({k: v.shape for k, v in flat.items()})
  if match:
    name, num_classes, resolution = match
    lines.append(f'Model config: {name} (num_classes={num_classes}, resolution={resolution})')
  else:
    lines.append('Model config: no entry of vit_jax.model_configs.MODEL_CONFIGS matches')
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Flags of `fetch`; defined by the program only, so importing this adds no flags elsewhere."""
  flags.DEFINE_enum('bucket', 'imagenet21k', checkpoint.BUCKETS,
                    'Bucket of the released checkpoint.', flag_values=flag_values)
  flags.DEFINE_string('dest', 'checkpoints', 'Directory to download into.',
                      flag_values=flag_values)
  flags.DEFINE_string('base_url', checkpoint.DEFAULT_BASE_URL,
                      'HTTPS root of the vit_models bucket.', flag_values=flag_values)
  flags.DEFINE_float('timeout', 10.0, 'Network timeout in seconds.', flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`inspect PATH` or `fetch NAME`; errors (OSError includes DownloadError) are the user's."""
  commands = ('inspect', 'fetch')
  if len(argv) != 3 or argv[1] not in commands:
    raise cli.UserError(f'Expected one of: {" | ".join(c + " ARG" for c in commands)}; '
                        f'got {" ".join(argv[1:]) or "nothing"}.')
  command, arg = argv[1:]
  if command == 'inspect':
    print(describe(arg))
  else:
    checkpoint.fetch(arg, bucket=flag_values.bucket, dest=flag_values.dest,
                     base_url=flag_values.base_url, timeout=flag_values.timeout)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

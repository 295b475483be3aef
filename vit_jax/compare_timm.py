"""Our model against timm's equivalent, in one process (`python -m vit_jax.benchmark
--compare_timm`): the comparison a user choosing between this project and timm would make.

Both sides run the same step on the same batch with the same threads: the forward pass, or a
train step (softmax cross-entropy, global-norm clipping at 1.0, SGD with momentum 0.9); timm
eager or `torch.compile`d, bfloat16 as timm's `torch.autocast`. Timing alternates the sides in
`pairs` blocks (`benchmark_lib.time_calls`), so that slow phases of a shared machine hit both;
the ratio (timm's step time / ours: > 1 means we are faster) is the median over the pairs.
torch and timm are optional (`pip install '.[compare]'`) and imported only here.
"""
import os
import statistics
import sys
from typing import Callable, Sequence

from vit_jax import benchmark_lib as lib
from vit_jax import model_configs

# Our model name -> timm's model of the same architecture (class token, exact GELU, LN 1e-6).
TIMM_MODELS = {
    'ViT-Ti_16': 'vit_tiny_patch16_224',
    'ViT-S_16': 'vit_small_patch16_224',
    'ViT-S_32': 'vit_small_patch32_224',
    'ViT-B_16': 'vit_base_patch16_224',
    'ViT-B_32': 'vit_base_patch32_224',
    'ViT-L_16': 'vit_large_patch16_224',
    'ViT-L_32': 'vit_large_patch32_224',
    'ViT-H_14': 'vit_huge_patch14_224',
}
INSTALL_HINT = "--compare_timm needs torch and timm: pip install '.[compare]'"


def timm_name(model: str) -> str:
  name = model_configs.get_model_config(model).model_name
  if name not in TIMM_MODELS:
    raise ValueError(f'No timm equivalent of {name}; --compare_timm knows {sorted(TIMM_MODELS)}.')
  return TIMM_MODELS[name]


def import_torch():
  """(torch, timm), or ImportError saying how to install them, or why this process cannot:
  triton (imported by timm through torchvision) crashes a process that has loaded TensorFlow,
  which the command itself never imports."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{INSTALL_HINT} ({e}).') from e
  if 'tensorflow' in sys.modules and 'timm' not in sys.modules:
    raise ImportError('--compare_timm cannot import timm in a process that has imported '
                      'TensorFlow (triton, which timm imports, crashes it); run '
                      '`python -m vit_jax.benchmark --compare_timm` in a process of its own.')
  try:
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{INSTALL_HINT} ({e}).') from e
  return torch, timm


def threads() -> int:
  """The CPUs this process may run on: XLA:CPU's thread pool size, given to torch too."""
  return len(os.sched_getaffinity(0))


def timm_stepper(spec: lib.Spec, *, compile_model: bool = False, seed: int = 0) -> Callable:
  """A no-argument callable running one timm step for `spec` (CUDA when our backend is a GPU),
  waiting for the device."""
  torch, timm = import_torch()
  torch.manual_seed(seed)
  torch.set_num_threads(threads())
  device = 'cuda' if lib.machine()['backend'] == 'gpu' else 'cpu'
  transformer = model_configs.get_model_config(spec.model).transformer
  model = timm.create_model(timm_name(spec.model), pretrained=False, img_size=spec.resolution,
                            num_classes=spec.num_classes, drop_rate=transformer.dropout_rate,
                            attn_drop_rate=transformer.attention_dropout_rate).to(device)
  images = torch.rand(spec.batch, 3, spec.resolution, spec.resolution, device=device) * 2 - 1
  labels = torch.randint(0, spec.num_classes, (spec.batch,), device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=spec.dtype == 'bfloat16')
  forward = torch.compile(model) if compile_model else model
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  if spec.mode == 'inference':
    model.eval()

    def call():
      with torch.inference_mode(), autocast:
        forward(images)
      sync()

    return call
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

  def call():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = torch.nn.functional.cross_entropy(forward(images).float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    sync()

  return call


def paired_times(calls: Sequence[Callable], *, pairs: int, steps: int) -> list:
  """[(median time of calls[0], of calls[1]) per pair]: alternating which side goes first."""
  out = []
  for i in range(pairs):
    order = (0, 1) if i % 2 == 0 else (1, 0)
    medians = {k: statistics.median(lib.time_calls(calls[k], steps)) for k in order}
    out.append((medians[0], medians[1]))
  return out


def compare(spec: lib.Spec, *, pairs: int = 3, compile_timm: bool = False) -> dict:
  """Times our step and timm's for `spec` in alternating pairs; returns both speeds and ratios."""
  lib.run_config(spec)
  if pairs < 1:
    raise ValueError(f'pairs={pairs}; expected at least 1.')
  torch, timm = import_torch()
  ours = lib.compiled_stepper(spec)
  theirs = timm_stepper(spec, compile_model=compile_timm)
  times = paired_times([ours, theirs], pairs=pairs, steps=spec.steps)
  ours_s = statistics.median(t[0] for t in times)
  timm_s = statistics.median(t[1] for t in times)
  ratios = [t[1] / t[0] for t in times]
  return {
      'model': spec.model, 'timm_model': timm_name(spec.model), 'resolution': spec.resolution,
      'batch': spec.batch, 'mode': spec.mode, 'dtype': spec.dtype, 'steps': spec.steps,
      'pairs': pairs, 'timm_compiled': compile_timm, 'threads': threads(),
      'ours_images_per_s': spec.batch / ours_s, 'timm_images_per_s': spec.batch / timm_s,
      'ratio': statistics.median(ratios), 'ratios': ratios,
      'pair_times_s': [list(t) for t in times],
      'torch': torch.__version__, 'timm': timm.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def format_result(r: dict) -> str:
  how = 'torch.compile' if r['timm_compiled'] else 'eager'
  return (f'{r["model"]} @{r["resolution"]} {r["mode"]} {r["dtype"]} batch {r["batch"]}: ours '
          f'{r["ours_images_per_s"]:.1f} images/s, timm {r["timm_model"]} ({how}) '
          f'{r["timm_images_per_s"]:.1f} images/s, {r["threads"]} threads: ratio '
          f'{r["ratio"]:.2f} (median of {r["pairs"]} pairs: '
          f'{" ".join(f"{x:.2f}" for x in r["ratios"])})')

r"""Everything worth knowing from one short accelerator run (scripts/device_check.sh runs this).

Parts, in order of importance, each recorded in OUT_DIR/<part>.json and in summary.json (a part
that fails records its error and the rest still run; a part that would start after the time
budget is recorded as skipped):

  checks      numerics in bf16: fused (cuDNN) vs einsum attention logits and grads against a
              float32 reference, remat and scan against the plain model, gradient accumulation
              against one big batch (relative errors ||a - b|| / ||b||, each with its bound).
  train       the train step with the speed switches (bf16, fused attention): images/s and MFU
              (ViT-B/16 at 224 and 384, ViT-L/16 at 224).
  timm        our train step against timm's same model with torch.compile, alternating pairs.
  inference   forward images/s.
  max_batch   the largest batch per device that really runs (one step; OOM = does not fit).

--dry_run runs the same parts on the CPU at a tiny size, with no time budget (the test suite).
--block_tensorflow makes `import tensorflow` fail first, as on accelerator images without it.
"""
import json
import os
import sys
import time
import traceback


def _block_tensorflow():
  """Makes `import tensorflow` (and tensorflow_datasets) fail as if TensorFlow were not installed
  (a None entry in sys.modules: ImportError on import, None from importlib.util.find_spec)."""
  for name in ('tensorflow', 'tensorflow_datasets'):
    sys.modules[name] = None


if '--block_tensorflow' in sys.argv:  # Before anything imports it.
  _block_tensorflow()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_jax import benchmark_lib as lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax import model_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('out_dir', None, 'Where the JSON files go.', required=True)
flags.DEFINE_bool('dry_run', False, 'Tiny sizes on any backend (CPU in the test suite).')
flags.DEFINE_bool('block_tensorflow', False, 'Fail every tensorflow import (see above).')
flags.DEFINE_float('budget_s', None, 'No part starts after this many seconds (default: 420, '
                   'none with --dry_run, which may run on a loaded CPU).')

# (model, resolution, batch) rows of the real run; the dry run replaces them all.
TRAIN_ROWS = [('ViT-B_16', 224, 256), ('ViT-L_16', 224, 128), ('ViT-B_16', 384, 64)]
INFERENCE_ROWS = [('ViT-B_16', 224, 512), ('ViT-L_16', 224, 256)]
TIMM_ROW = ('ViT-B_16', 224, 128)
MAX_BATCH_ROW = ('ViT-B_16', 224, 256)
DRY_ROW = ('micro', 32, 4)


def _size(dry_run: bool) -> dict:
  if dry_run:
    return dict(train=[DRY_ROW], inference=[DRY_ROW], timm=('ViT-Ti_16', 32, 2),
                max_batch=DRY_ROW, steps=2, pairs=1, cap=8, granularity=4, check_model='micro',
                check_resolution=32, check_layers=2)
  return dict(train=TRAIN_ROWS, inference=INFERENCE_ROWS, timm=TIMM_ROW, max_batch=MAX_BATCH_ROW,
              steps=10, pairs=3, cap=4096, granularity=64, check_model='ViT-Ti_16',
              check_resolution=64, check_layers=2)


def _spec(row, mode: str, steps: int, **kw) -> lib.Spec:
  model, resolution, batch = row
  return lib.Spec(model=model, resolution=resolution, batch=batch, mode=mode, dtype='bfloat16',
                  attention_impl='fused', steps=steps, num_devices=1, **kw)


# ---------------------------------------------------------------------------------------------
# Numerics.


def relative_error(a, b) -> float:
  """||a - b|| / ||b|| over all leaves of two trees, in float64."""
  la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
  lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
  num = sum(float(np.sum((x - y)**2)) for x, y in zip(la, lb))
  den = sum(float(np.sum(y**2)) for y in lb)
  return float(np.sqrt(num / max(den, 1e-30)))


def _check_config(size: dict):
  cfg = model_configs.get_model_config(size['check_model'])
  cfg.transformer.num_layers = size['check_layers']
  return cfg


def _perturbed(params):
  """`params` + small noise: the zero-initialised head would make most gradients zero."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
                                   for p, k in zip(leaves, keys)])


def _logits_and_grads(cfg, params, images, labels, **overrides):
  model = models.build_model(cfg, 10, **overrides)

  def loss(p):
    logits = model.apply({'params': p}, images, train=False)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels]), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _uses_cudnn_attention(cfg, params, images):
  """Whether the compiled fused attention calls cuDNN (None off GPUs: it never does there)."""
  if jax.default_backend() != 'gpu':
    return None
  model = models.build_model(cfg, 10, dtype=jnp.bfloat16, attention_impl='fused')
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  return 'cudnn' in forward.lower(params, images).compile().as_text().lower()


def _case(name: str, error: float, bound: float, **extra) -> dict:
  return {'check': name, 'relative_error': error, 'bound': bound, 'ok': error <= bound, **extra}


def numerics(size: dict) -> list:
  """Relative errors of the bf16 attention paths, remat, scan (against the plain model)."""
  cfg = _check_config(size)
  r = size['check_resolution']
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (8, r, r, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  model = models.build_model(cfg, 10)
  params = _perturbed(jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(
      images)['params'])
  with jax.default_matmul_precision('highest'):
    reference = _logits_and_grads(cfg, params, images, labels)
  bf16 = {impl: _logits_and_grads(cfg, params, images, labels, dtype=jnp.bfloat16,
                                  attention_impl=impl)
          for impl in ('xla', 'fused')}  # 'pallas' is a TPU kernel.
  out = []
  for part, k, bound in (('logits', 0, 3e-2), ('grads', 1, 5e-2)):
    xla_error = relative_error(bf16['xla'][k], reference[k])
    out.append(_case(f'bf16 einsum attention {part} vs float32', xla_error, bound))
    out.append(_case(f'bf16 fused attention {part} vs float32',
                     relative_error(bf16['fused'][k], reference[k]), max(2 * xla_error, bound)))
  out[-1]['cudnn'] = _uses_cudnn_attention(cfg, params, images)
  with jax.default_matmul_precision('highest'):
    remat = _logits_and_grads(cfg, params, images, labels, remat_policy='full')
    scanned = _logits_and_grads(cfg, models.stack_encoder_blocks(params), images, labels,
                                scan_layers=True)
  out.append(_case('remat=full grads vs plain', relative_error(remat[1], reference[1]), 1e-4))
  out.append(_case('scan logits vs plain', relative_error(scanned[0], reference[0]), 1e-4))
  out.append(_case('scan grads vs plain', relative_error(
      models.unstack_encoder_blocks(scanned[1]), reference[1]), 1e-4))
  out.append(accumulation(size))
  return out


def accumulation(size: dict) -> dict:
  """The update of one train step with accum_steps=2 against accum_steps=1, same batch."""
  from vit_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  r = size['check_resolution']
  spec = lib.Spec(model=size['check_model'], resolution=r, batch=8, mode='train', num_devices=1)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.uniform(-1, 1, (8, r, r, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  updates = []
  for accum in (1, 2):
    config = lib.run_config(spec)
    config.model.transformer.num_layers = size['check_layers']
    config.accum_steps, config.warmup_steps = accum, 0  # No warm-up: a non-zero step.
    trainer = trainer_lib.Trainer(config, 10, mesh=sharding.make_mesh(spec.devices()))
    state = trainer.initial_state()
    state['params'] = _perturbed(state['params'])
    before = jax.device_get(state['params'])
    with jax.default_matmul_precision('highest'):
      state, _ = trainer.train_step(state, batch)
    updates.append(jax.tree.map(np.subtract, jax.device_get(state['params']), before))
  norm = float(np.sqrt(sum(np.sum(u**2) for u in jax.tree.leaves(updates[0]))))
  return _case('accum_steps=2 update vs accum_steps=1', relative_error(*updates), 1e-4,
               update_norm=norm)


# ---------------------------------------------------------------------------------------------
# Speed.


def train_rows(size: dict) -> list:
  return [lib.run(_spec(row, 'train', size['steps'])) for row in size['train']]


def inference_rows(size: dict) -> list:
  return [lib.run(_spec(row, 'inference', size['steps'])) for row in size['inference']]


class Skipped(Exception):
  """A part that cannot run here (recorded as skipped, not as an error)."""


def timm_ratio(size: dict) -> dict:
  from vit_jax import compare_timm  # pylint: disable=g-import-not-at-top
  try:
    compare_timm.import_torch()
  except ImportError as e:
    raise Skipped(str(e)) from e
  return compare_timm.compare(_spec(size['timm'], 'train', size['steps']), pairs=size['pairs'],
                              compile_timm=not FLAGS.dry_run)


def max_batch(size: dict) -> dict:
  return lib.find_max_batch(_spec(size['max_batch'], 'train', 1), method='run', cap=size['cap'],
                            granularity=size['granularity'])


PARTS = (('checks', numerics), ('train', train_rows), ('timm', timm_ratio),
         ('inference', inference_rows), ('max_batch', max_batch))


def _write(path: str, data) -> None:
  with open(path, 'w') as f:
    json.dump(data, f, indent=2, default=str)


def _percent(x) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def _brief(name: str, result) -> str:
  """One summary line of a part's result."""
  if name == 'checks':
    return ', '.join(f'{c["check"]}: {c["relative_error"]:.2g}{"" if c["ok"] else " FAIL"}'
                     for c in result)
  if name in ('train', 'inference'):
    return '; '.join(f'{r["model"]}@{r["resolution"]} b{r["batch"]} {r["images_per_s"]:.0f} im/s'
                     f' MFU {_percent(r["mfu"])}' for r in result)
  if name == 'timm':
    return (f'ours {result["ours_images_per_s"]:.0f} vs timm {result["timm_images_per_s"]:.0f} '
            f'im/s: ratio {result["ratio"]:.2f}')
  return f'max batch/device {result["max_batch_per_device"]}'


def main(argv):
  del argv
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  size = _size(FLAGS.dry_run)
  start = time.perf_counter()
  summary = {'machine': lib.machine(), 'dry_run': FLAGS.dry_run, 'parts': {},
             'tensorflow_blocked': FLAGS.block_tensorflow}
  print(f'device_check: {summary["machine"]}', flush=True)
  for name, part in PARTS:
    elapsed = time.perf_counter() - start
    if elapsed > (FLAGS.budget_s or (float('inf') if FLAGS.dry_run else 420)):
      summary['parts'][name] = {'status': 'skipped', 'reason': f'budget ({elapsed:.0f} s)'}
      print(f'[{name}] skipped: time budget', flush=True)
      continue
    try:
      result = part(size)
      status = {'status': 'ok', 'brief': _brief(name, result)}
      _write(os.path.join(FLAGS.out_dir, f'{name}.json'), result)
    except Skipped as e:
      status = {'status': 'skipped', 'reason': str(e)}
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      status = {'status': 'error', 'error': f'{type(e).__name__}: {e}'[:500]}
    status['seconds'] = time.perf_counter() - start - elapsed
    summary['parts'][name] = status
    _write(os.path.join(FLAGS.out_dir, 'summary.json'), summary)  # Kept if a later part hangs.
    print(f'[{name}] {status["status"]} in {status["seconds"]:.0f} s: '
          f'{status.get("brief") or status.get("error") or status.get("reason")}', flush=True)
  _write(os.path.join(FLAGS.out_dir, 'summary.json'), summary)  # With the skipped parts.
  failed = [n for n, s in summary['parts'].items() if s['status'] == 'error']
  failed += [c['check'] for c in _read_checks(FLAGS.out_dir) if not c['ok']]
  print(f'device_check: {"FAILED: " + ", ".join(failed) if failed else "all parts ok"}')
  return 1 if failed else 0


def _read_checks(out_dir: str) -> list:
  path = os.path.join(out_dir, 'checks.json')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


if __name__ == '__main__':
  app.run(main)

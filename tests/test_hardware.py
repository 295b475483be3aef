"""Peak-FLOPs lookup, the huge-page malloc tunable of scripts/cpu_env.sh, the remat caveat."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import hardware
from vit_jax import model_configs
from vit_jax import models
from vit_jax import xla_flags

_THP = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')
_REPO = pathlib.Path(__file__).resolve().parents[1]

# A jitted step with a 36 MiB temporary: glibc maps such blocks fresh on every call.
_FAULTS_PER_CALL = '''
import resource, jax, jax.numpy as jnp
@jax.jit
def f(a, b):
  y = jnp.tanh(a @ b)
  return (y.T @ y).sum() + y.max()
a, b = jnp.ones((8192, 16)), jnp.ones((16, 1152)) / 64
f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(a, b).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
'''


class _Device:
  def __init__(self, kind):
    self.device_kind = kind


def test_peak_flops_by_longest_prefix_or_override():
  assert hardware.peak_flops(_Device('NVIDIA H100 80GB HBM3')) == 989e12
  assert hardware.peak_flops(_Device('TPU v5 lite')) == 197e12
  assert hardware.peak_flops(_Device('TPU v5')) == 459e12  # v5p: one megacore device per chip.
  assert hardware.peak_flops(_Device('TPU v3')) == 123e12 / 2  # One device per core.
  assert hardware.peak_flops(_Device('cpu')) is None
  assert hardware.peak_flops(_Device('cpu'), override=2e11) == 2e11


def test_check_host_allocator_reads_the_tunable(monkeypatch):
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  assert xla_flags.check_host_allocator() is (not sys.platform.startswith('linux'))
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  assert xla_flags.check_host_allocator()
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
  assert xla_flags.check_host_allocator() is (not sys.platform.startswith('linux'))


def test_remat_caveat_only_for_unrolled_remat_on_cpu(monkeypatch):
  assert 'XLA:CPU' in models.remat_caveat('cpu', 'full', False)
  for args in (('cpu', 'none', False), ('cpu', 'full', True), ('cpu', 'dots_saveable', True),
               ('gpu', 'full', False), ('tpu', 'full', False)):
    assert models.remat_caveat(*args) is None
  config = model_configs.get_model_config('micro')
  config.remat_policy = 'full'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert not models.check_remat_layout(config)
  config.scan_layers = True
  assert models.check_remat_layout(config)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config.scan_layers = False
  assert models.check_remat_layout(config)


def _faults_per_call(env):
  out = subprocess.run([sys.executable, '-c', _FAULTS_PER_CALL], env=env, check=True,
                       capture_output=True, text=True).stdout
  return float(out.split()[-1])


@pytest.mark.skipif(not _THP.exists() or '[never]' in _THP.read_text(),
                    reason='the kernel offers no transparent huge pages')
def test_cpu_env_cuts_the_page_faults_of_xla_temporaries():
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  tuned = subprocess.run(['bash', '-c', 'source scripts/cpu_env.sh; echo "$GLIBC_TUNABLES"'],
                         cwd=_REPO, env=env, check=True, capture_output=True,
                         text=True).stdout.strip()
  assert tuned == xla_flags.HUGEPAGE_TUNABLE
  plain = _faults_per_call(env)
  huge = _faults_per_call({**env, 'GLIBC_TUNABLES': tuned})
  assert plain > 36 * 2**20 / 4096 / 2, plain  # At least half of the 36 MiB faulted in 4 KiB pages.
  assert huge < plain / 4, (huge, plain)


def test_set_cpu_xla_flags_adds_the_defaults_and_keeps_the_users():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  flags = xla_flags.set_cpu_xla_flags(env)
  assert flags == env['XLA_FLAGS']
  assert flags.split() == ['--xla_force_host_platform_device_count=8'] + [
      f'--{k}={v}' for k, v in xla_flags.CPU_XLA_FLAGS.items()]
  assert xla_flags.set_cpu_xla_flags(env) == flags  # Idempotent.
  name, ours = next(iter(xla_flags.CPU_XLA_FLAGS.items()))
  env = {'XLA_FLAGS': f'--{name}=users_value'}
  assert xla_flags.set_cpu_xla_flags(env).split() == [f'--{name}=users_value']
  assert f'--{name}={ours}' not in env['XLA_FLAGS']
  env = {xla_flags.NO_CPU_FLAGS_ENV: '1'}
  assert xla_flags.set_cpu_xla_flags(env) == '' and 'XLA_FLAGS' not in env


# Logits and every gradient of a small ViT (head_dim 64, as ViT-Ti/S/B) under this process's XLA
# flags, with the flags it ran under.
_LOGITS_AND_GRADS = '''
import os, sys
import jax, jax.numpy as jnp, numpy as np
from flax import traverse_util
from vit_jax import model_configs, models
cfg = model_configs.get_model_config('ViT-Ti_16')
cfg.transformer.num_layers = 2
model = models.build_model(cfg, 10)
rng = np.random.default_rng(0)
images = jnp.asarray(rng.uniform(-1, 1, (4, 64, 64, 3)), jnp.float32)
labels = jnp.asarray(rng.integers(0, 10, 4))
params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))['params']
params = jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), params)
def loss(p):
  logits = model.apply({'params': p}, images, train=False)
  return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits
(_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(grads).items()}
# How many of a matmul's and of a reduction's ops the compiled program hands to YNNPACK.
square = jnp.ones((64, 64))
ynn = [jax.jit(f).lower(square, square).compile().as_text().count('__ynn_fusion')
       for f in (jnp.matmul, lambda x, y: (x * y).sum(0))]
np.savez(sys.argv[1], logits=np.asarray(logits), xla_flags=os.environ.get('XLA_FLAGS', ''),
         ynn_dot_and_reduce=np.asarray(ynn), **flat)
'''


def test_cpu_xla_flags_compute_the_same_function(tmp_path):
  """The project's XLA:CPU flags against XLA's defaults: the same logits and gradients, from a
  different program (dots in XLA's own kernels, not YNNPACK's; reductions in YNNPACK's)."""
  runs = {}
  for name, extra in (('xla', {xla_flags.NO_CPU_FLAGS_ENV: '1'}), ('project', {})):
    env = {k: v for k, v in os.environ.items() if k != xla_flags.NO_CPU_FLAGS_ENV}
    env.update(PYTHONPATH=str(_REPO), XLA_FLAGS='', JAX_PLATFORMS='cpu', **extra)
    path = tmp_path / f'{name}.npz'
    subprocess.run([sys.executable, '-c', _LOGITS_AND_GRADS, str(path)], env=env, check=True,
                   cwd=_REPO)
    runs[name] = dict(np.load(path))
  assert str(runs['xla'].pop('xla_flags')) == ''
  project_flags = str(runs['project'].pop('xla_flags')).split()
  assert project_flags == [f'--{k}={v}' for k, v in xla_flags.CPU_XLA_FLAGS.items()]
  assert list(runs['xla'].pop('ynn_dot_and_reduce')) == [1, 1]
  assert list(runs['project'].pop('ynn_dot_and_reduce')) == [0, 1]
  assert set(runs['xla']) == set(runs['project']) and len(runs['xla']) > 20
  # The key's bias has no gradient (softmax ignores a shift shared by all keys): both runs give
  # rounding noise there, which is compared with the scale of the value's bias gradient.
  for key, reference in runs['xla'].items():
    project = runs['project'][key]
    if key.endswith('key/bias'):
      scale = np.linalg.norm(runs['xla'][key.replace('key/bias', 'value/bias')])
      assert max(np.linalg.norm(reference), np.linalg.norm(project)) < 1e-5 * scale, key
      continue
    assert np.abs(reference).max() > 0, key
    error = np.linalg.norm(project - reference) / np.linalg.norm(reference)
    assert error < 1e-5, (key, error)


_CGROUP_LIMIT = 3 * 2**30  # Above what the command holds when it checks (~0.5 GiB), below the step.


def _memory_cgroup(tmp_name: str) -> tuple:
  """(directory, file to write a pid to) of a new memory cgroup limited to _CGROUP_LIMIT (v1
  memory controller, else v2), or skips where this machine does not let the test make one."""
  candidates = [(pathlib.Path('/sys/fs/cgroup/memory'), 'memory.limit_in_bytes'),
                (pathlib.Path('/sys/fs/cgroup'), 'memory.max')]
  for root, limit_file in candidates:
    if not (root / limit_file).exists() and not (root / 'cgroup.controllers').exists():
      continue
    group = root / tmp_name
    try:
      group.mkdir(exist_ok=True)
      (group / limit_file).write_text(str(_CGROUP_LIMIT))
      return group, group / 'cgroup.procs'
    except OSError:
      if group.exists():
        group.rmdir()
  pytest.skip('no memory cgroup can be made here (needs root and a memory controller)')


def test_main_in_a_memory_limited_cgroup_refuses_a_step_the_limit_cannot_hold(tmp_path):
  """The container case: the host has far more free memory than the step needs (~5.5 GiB), the
  cgroup does not (3 GiB); the command says so before anything is written, instead of being
  OOM-killed with exit 137 and no message."""
  group, procs = _memory_cgroup(f'vit_jax_test_{os.getpid()}')
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
             f"--config={_REPO}/tests/fault_tolerance_config.py", '--config.batch=32768',
             '--config.pp.resolution=32']
  try:
    done = subprocess.run(['sh', '-c', f'echo $$ > {procs} && exec "$@"', 'sh', *command],
                          cwd=_REPO, capture_output=True, text=True, timeout=300)
  finally:
    group.rmdir()
  assert done.returncode == 2, done.stderr[-3000:]
  assert "of memory: The train step needs" in done.stderr
  assert 'the memory its cgroup (container) limit leaves' in done.stderr
  assert not workdir.exists()

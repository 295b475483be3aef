"""Peak-FLOPs lookup, the huge-page malloc tunable of scripts/cpu_env.sh, the remat caveat."""
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from vit_jax import hardware
from vit_jax import model_configs

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
  assert hardware.peak_flops(_Device('TPU v5p')) == 459e12
  assert hardware.peak_flops(_Device('cpu')) is None
  assert hardware.peak_flops(_Device('cpu'), override=2e11) == 2e11


def test_check_host_allocator_reads_the_tunable(monkeypatch):
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  assert hardware.check_host_allocator() is (not sys.platform.startswith('linux'))
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  assert hardware.check_host_allocator()
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
  assert hardware.check_host_allocator() is (not sys.platform.startswith('linux'))


def test_remat_caveat_only_for_unrolled_remat_on_cpu(monkeypatch):
  assert 'XLA:CPU' in hardware.remat_caveat('cpu', 'full', False)
  for args in (('cpu', 'none', False), ('cpu', 'full', True), ('cpu', 'dots_saveable', True),
               ('gpu', 'full', False), ('tpu', 'full', False)):
    assert hardware.remat_caveat(*args) is None
  config = model_configs.get_model_config('testing')
  config.remat_policy = 'full'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert not hardware.check_remat_layout(config)
  config.scan_layers = True
  assert hardware.check_remat_layout(config)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config.scan_layers = False
  assert hardware.check_remat_layout(config)


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
  assert tuned == hardware.HUGEPAGE_TUNABLE
  plain = _faults_per_call(env)
  huge = _faults_per_call({**env, 'GLIBC_TUNABLES': tuned})
  assert plain > 36 * 2**20 / 4096 / 2, plain  # At least half of the 36 MiB faulted in 4 KiB pages.
  assert huge < plain / 4, (huge, plain)

"""`python -m vit_jax.plan`: the real train and eval steps compiled by libtpu's compiler for Cloud
TPU slices (compile-only devices; nothing runs on a TPU, the rest of the suite stays on CPU)."""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import cli
from vit_jax import config_lib
from vit_jax import flops
from vit_jax import hardware
from vit_jax import plan_lib
from vit_jax import trainer as trainer_lib
from vit_jax import sharding
from vit_jax import tpu_compile

_REPO = pathlib.Path(__file__).resolve().parents[1]
_CLASSES = 10


def _config(**changes):
  """A small ViT whose matmuls dominate its work and whose state its big matrices (256 wide,
  heads of 128, 17 tokens), batch 64."""
  config = config_lib.base_config()
  config_lib.set_model(config, 'micro')
  config.model.hidden_size, config.model.patches.size = 256, (8, 8)
  config.model.transformer.mlp_dim = 1024
  config.pp.resolution, config.num_classes = 32, _CLASSES
  config.batch = config.batch_eval = 64
  return plan_lib.with_changes(config, changes)


def _full_bytes(tree) -> int:
  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def test_accelerator_types_map_through_the_generation_table():
  cases = {'v2-8': ('v2:2x2', 8, 1), 'v3-8': ('v3:2x2', 8, 1), 'v3-32': ('v3:4x4', 32, 4),
           'v4-8': ('v4:2x2x1', 4, 1), 'v4-32': ('v4:2x2x4', 16, 4),
           'v5litepod-8': ('v5e:2x4', 8, 1), 'v5litepod-16': ('v5e:4x4', 16, 2),
           'v5p-8': ('v5p:2x2x1', 4, 1), 'v6e-8': ('v6e:2x4', 8, 1)}
  for name, (topology, devices, hosts) in cases.items():
    tpu = hardware.tpu_slice(name)
    assert (tpu.topology_name, tpu.devices, tpu.hosts) == (topology, devices, hosts), name
  for name in ('v3-32', 'v5litepod-16', 'v4-8'):  # libtpu agrees on devices and hosts.
    tpu = hardware.tpu_slice(name)
    devices = tpu_compile.compile_only_devices(tpu)
    assert len(devices) == tpu.devices
    assert len({d.process_index for d in devices}) == tpu.hosts
    assert devices[0].device_kind == tpu.generation.device_kind
  assert hardware.tpu_slice('v3-8').generation.hbm_bytes_per_device == 16 * 2**30
  assert hardware.tpu_slice('v4-8').generation.hbm_bytes_per_device == 32 * 2**30
  for bad in ('v3-4', 'v7-8', 'v5litepod-2', 'tpu', 'v4-12'):
    with pytest.raises(ValueError, match='accelerator type'):
      hardware.tpu_slice(bad)


@pytest.mark.parametrize('name', ['v3-8', 'v5litepod-16'])
def test_state_bytes_per_device_replicated_and_fsdp(name):
  """XLA's argument bytes = the whole state (replicated) or about 1/N of it (FSDP), plus the
  device's share of the batch; expectations from the abstract state's shapes alone. XLA:TPU
  stores arrays in (8, 128) tiles, so its bytes exceed the logical ones by the padding: up to 5%
  replicated; up to 60% of the much smaller FSDP shard (shards are narrower, and leaves under
  sharding.FSDP_MIN_SIZE stay whole)."""
  tpu = hardware.tpu_slice(name)
  devices = tpu_compile.compile_only_devices(tpu)
  n = len(devices)
  trainer = trainer_lib.Trainer(_config(), _CLASSES, mesh=sharding.make_mesh(devices))
  state = _full_bytes(trainer.abstract_state)
  batch = _full_bytes(trainer.abstract_batch) // n
  replicated = tpu_compile.compile_train_and_eval(_config(), tpu, devices, with_eval=False)
  assert state + batch <= replicated['train'].arguments_bytes <= 1.05 * (state + batch)
  assert replicated['train'].fits
  fsdp = tpu_compile.compile_train_and_eval(_config(sharding='fsdp'), tpu, devices,
                                            with_eval=False)
  assert state / n + batch <= fsdp['train'].arguments_bytes <= 1.6 * state / n + batch


def test_flops_per_step_against_the_analytic_count_and_loops_counted():
  """XLA:TPU's FLOPs of the train step vs vit_jax.flops' forward matmuls x 3. Tolerance: the
  analytic count leaves out what XLA counts besides matmuls (layer norms, softmax, GELU, the
  loss, the optimizer update: ~4% here) and the patch embedding's input gradient that backward
  never computes (~1% here): 0.9 to 1.1. With scanned layers and accumulation (loops XLA counts
  once) the counted FLOPs equal the unrolled step's."""
  tpu = hardware.tpu_slice('v3-8')
  devices = tpu_compile.compile_only_devices(tpu)
  plain = tpu_compile.compile_train_and_eval(_config(), tpu, devices)
  config = _config()
  analytic = flops.train_step_flops(config.model, config.pp.resolution, _CLASSES)
  measured = plain['train'].flops_per_device * len(devices) / config.batch
  assert 0.9 < measured / analytic < 1.1, (measured, analytic)
  forward = plain['eval'].flops_per_device * len(devices) / config.batch_eval
  assert 0.9 < forward / flops.forward_flops(config.model, config.pp.resolution, _CLASSES) < 1.1
  assert plain['train'].compiler_estimate_s > 0  # Valid on v3.
  looped = tpu_compile.compile_train_and_eval(
      _config(**{'model.scan_layers': True, 'accum_steps': 2}), tpu, devices, with_eval=False)
  for step in ('train',):
    np.testing.assert_allclose(looped[step].flops_per_device, plain[step].flops_per_device,
                               rtol=0.02)
    assert looped[step].compiler_estimate_s is None


def test_fsdp_steps_are_counted_without_the_compilers_windowed_einsum_loops(monkeypatch):
  """XLA:TPU may compute a matmul with an FSDP-gathered operand as a loop over the shards, whose
  body its cost analysis counts once (ViT-H/14 at 378px on v5e: 0.71x the FLOPs). So an FSDP
  step's cost comes from counted_cost, whose compiles turn those loops off, and equals the
  replicated step's FLOPs (the same arithmetic)."""
  tpu = hardware.tpu_slice('v5litepod-8')
  devices = tpu_compile.compile_only_devices(tpu)
  options = []
  compile_ = jax.stages.Lowered.compile

  def spy(self, compiler_options=None):
    options.append(compiler_options)
    return compile_(self, compiler_options)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', spy)
  flops_of = {}
  for strategy in ('replicate', 'fsdp'):
    options.clear()
    train = tpu_compile.compile_train_and_eval(_config(sharding=strategy), tpu, devices,
                                               with_eval=False)['train']
    flops_of[strategy] = train.flops_per_device
    counted = [o for o in options if o == tpu_compile.COUNTING_OPTIONS]
    # The step itself; for FSDP also the counted copies (this model of 1 block: 1 and 2 images).
    assert (len(counted), len(options)) == ((0, 1) if strategy == 'replicate' else (2, 3))
  np.testing.assert_allclose(flops_of['fsdp'], flops_of['replicate'], rtol=0.02)


def test_plan_command_end_to_end(tmp_path):
  out = tmp_path / 'plan.json'
  args = [sys.executable, '-m', 'vit_jax.plan', '--config=configs/vit.py:testing,cifar10',
          '--config.pp.resolution=32', '--config.batch=64', '--config.batch_eval=64',
          '--config.total_steps=1000', '--topology=v3-8', f'--json_out={out}']
  done = subprocess.run(args, cwd=_REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'fits' in done.stdout and 'core-days' in done.stdout
  assert 'the analytic forward + backward count per image' in done.stdout
  assert "the count misses work" not in done.stdout
  (result,) = json.loads(out.read_text())
  assert {k: result[k] for k in ('topology', 'devices', 'hosts', 'hbm_bytes_per_device',
                                 'suggestion')} == {
      'topology': 'v3-8', 'devices': 8, 'hosts': 1, 'hbm_bytes_per_device': 16 * 2**30,
      'suggestion': None}
  fields = {'arguments_bytes', 'temporaries_bytes', 'total_bytes', 'fits', 'flops_per_device',
            'bytes_accessed_per_device', 'compiler_estimate_s', 'compile_s'}
  for step in ('train', 'eval'):
    assert set(result[step]) == fields
    assert result[step]['fits']
    # XLA's total: arguments + temporaries + outputs not donated (the metrics, the eval counts).
    extra = result[step]['total_bytes'] - (result[step]['arguments_bytes']
                                           + result[step]['temporaries_bytes'])
    assert 0 <= extra < 2**20
  run = result['whole_run']
  assert run['total_flops'] == pytest.approx(result['train']['flops_per_device'] * 8 * 1000)
  assert run['core_days'] == pytest.approx(run['total_flops'] / (61.5e12 * 0.5 * 86400))
  bad = [(['--topology=v9-8'], 'Unknown TPU accelerator type'),
         (['--config.batch=48', '--topology=v3-32'], 'not divisible by the 32 devices')]
  for flags_, message in bad:
    done = subprocess.run(args[:4] + flags_, cwd=_REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == cli.EXIT_ERROR, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]


def _crash_once(marker: str) -> str:
  """Kills its process with SIGSEGV, as libtpu's compiler may, unless `marker` exists (it makes
  it first): so it crashes in the first attempt only."""
  if not os.path.exists(marker):
    pathlib.Path(marker).touch()
    _crash()
  return f'compiled in process {os.getpid()}'


def _crash():
  os.kill(os.getpid(), signal.SIGSEGV)


def _refuse(error: Exception):
  raise error


class _UnpicklableError(Exception):

  def __init__(self, message: str, code: int):  # Unpickling calls it with `message` only.
    super().__init__(message)
    self.code = code


def _refuse_unpicklably():
  raise _UnpicklableError('no pickle', 1)


def test_a_compile_whose_process_crashes_is_retried_then_an_error(tmp_path):
  result = tpu_compile.in_child(_crash_once, str(tmp_path / 'crashed'))
  assert result.startswith('compiled in process') and result != f'compiled in process {os.getpid()}'
  with pytest.raises(tpu_compile.CompilerCrash,
                     match=r"compiler crashed \(SIGSEGV\) in all 2 attempts"):
    tpu_compile.in_child(_crash, attempts=2)
  assert issubclass(tpu_compile.CompilerCrash, cli.UserError)  # An `Error:` line, exit 2.
  with pytest.raises(cli.UserError, match='not divisible'):
    tpu_compile.in_child(_refuse, cli.UserError('batch 48 is not divisible'))
  with pytest.raises(RuntimeError, match=r'_UnpicklableError: no pickle'):
    tpu_compile.in_child(_refuse_unpicklably)


def test_libtpu_missing_is_a_user_error_naming_the_install(monkeypatch):
  monkeypatch.setattr(tpu_compile.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(cli.UserError, match=r"pip install -e '\.\[tpu\]'"):
    tpu_compile.compile_only_devices(hardware.tpu_slice('v3-8'))


def test_out_of_memory_message_parsed():
  error = RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required '
                       'for HLO temporaries (138.11G) exceeds available HBM (15.48G).\nmore')
  oom = tpu_compile.out_of_memory(error)
  assert oom['required_bytes'] == int(138.11 * 2**30)
  assert oom['available_bytes'] == int(15.48 * 2**30)
  assert tpu_compile.out_of_memory(RuntimeError('INTERNAL: something else')) is None


def test_a_step_that_does_not_fit_gets_the_smallest_change_that_does():
  """A tiny model with a huge head and batch (2M classes, 1024 images per v2 core: 8 GiB of
  logits and their gradients): the compiler's RESOURCE_EXHAUSTED numbers, then a change that
  compiles within the HBM."""
  config = config_lib.base_config()
  config_lib.set_model(config, 'micro')
  config.pp.resolution, config.num_classes = 16, 2_000_000
  config.batch = config.batch_eval = 8 * 1024
  result = plan_lib.plan(config, 'v2-8', utilization=0.5, with_eval=False)
  train, hbm = result['train'], 8 * 2**30
  assert not train['fits']
  assert train['out_of_memory']['required_bytes'] > train['out_of_memory']['available_bytes']
  assert train['total_bytes'] > hbm
  assert result['suggestion'] == '--config.accum_steps=2'  # Remat cannot shrink the head.
  assert result['suggested_train']['fits']
  assert result['suggested_train']['total_bytes'] <= hbm
  # The whole run is counted from the suggested step (its accumulation loop counted per pass).
  assert result['whole_run']['total_flops'] == pytest.approx(
      result['suggested_train']['flops_per_device'] * 8 * config.total_steps)
  assert result['whole_run']['flops_per_image'] > 3 * flops.forward_flops(
      config.model, 16, config.num_classes)  # Matmuls, and softmax over 2M classes on top.


def test_compiling_for_a_tpu_leaves_the_environment_as_it_was():
  """libtpu's off-VM variables are set only while it loads, and what libtpu sets itself then (in
  the C environment, invisible to os.environ) is removed: a CLOUD_TPU_TASK_ID left there made a
  `vit_jax.main` started later by the same process (a test worker) join a TPU pod. In a fresh
  process, where libtpu loads for the first time."""
  code = '\n'.join([
      'import os, subprocess',
      'from vit_jax import hardware, tpu_compile',
      "child = lambda: set(subprocess.run(['env'], capture_output=True, text=True).stdout"
      '.splitlines())',
      'before, python_before = child(), dict(os.environ)',
      "tpu_compile.compile_only_devices(hardware.tpu_slice('v3-8'))",
      'assert dict(os.environ) == python_before',
      'assert child() == before, sorted(child() ^ before)'])
  done = subprocess.run([sys.executable, '-c', code], cwd=_REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]


def test_a_flop_count_below_what_the_matmuls_need_is_called_out():
  run = lambda ratio: {'flops_per_image': ratio * 1e10, 'analytic_flops_per_image': 1e10}
  under, even = (plan_lib.describe_flops_ratio(run(r)) for r in (0.55, 1.0))
  assert under.startswith('0.55x the analytic forward + backward count')
  assert under.endswith("; below 0.9, the count misses work: the totals above are too low")
  assert even.startswith('1.00x the analytic') and even.endswith("dropout's random bits)")

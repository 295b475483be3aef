"""The start-up line naming the backend, and the warning for big models on the CPU backend."""
import jax

from vit_jax import hardware
from vit_jax import model_configs


def test_backend_summary_names_backend_kind_devices_and_processes():
  kind = jax.devices()[0].device_kind
  assert hardware.backend_summary() == (
      f'JAX backend cpu: 8 x {kind} (8 on this process), 1 process(es).')


def test_models_larger_than_vit_s_on_cpu_get_the_install_command(caplog):
  assert hardware.check_accelerator(model_configs.get_model_config('ViT-S_16'))
  assert hardware.check_accelerator(model_configs.get_model_config('micro'))
  assert not caplog.records
  assert not hardware.check_accelerator(model_configs.get_model_config('ViT-B_16'))
  message = caplog.records[-1].getMessage()
  assert 'Training ViT-B_16 (hidden size 768, larger than ViT-S) on the CPU backend' in message
  assert "pip install -e '.[tpu]'" in message and "'.[cuda12]'" in message

"""C10 (vit_jax.claims.compute): Table 2's core-days against compiled FLOPs; the rule on given
FLOPs, the compiled count on a tiny model (the real models take minutes to compile)."""
import pytest

from vit_jax import flops
from vit_jax import model_configs
from vit_jax.claims import catalog
from vit_jax.claims import compute
from vit_jax.claims import verdicts


def _analytic(model, classes):
  return flops.train_step_flops(model_configs.get_model_config(model), 224, classes)


def test_utilization_and_verdict_from_given_flops():
  rows, verdict = compute.check(_analytic)
  huge = rows[0]
  assert huge['name'] == 'ViT-H/14 (JFT)'
  total = _analytic('ViT-H_14', compute.JFT_CLASSES) * 14 * 303e6
  assert huge['total_flops'] == pytest.approx(total)
  assert huge['utilization'] == pytest.approx(total / (2500 * 86400 * 61.5e12))
  assert 0 < huge['utilization'] < 1
  assert verdict.verdict == verdicts.CONSISTENT  # BiT-L: more FLOPs, and every figure possible.
  assert '3.96x the core-days' in verdict.evidence
  cheap_bit = lambda model, classes: _analytic(model, classes) / (100 if 'BiT' in model else 1)
  assert compute.check(cheap_bit)[1].verdict == verdicts.NOT_CONSISTENT
  impossible = lambda model, classes: 1e3 * _analytic(model, classes)  # Above 100% of peak.
  assert compute.check(impossible)[1].verdict == verdicts.NOT_CONSISTENT


def test_bit_l_is_in_the_model_table():
  config = model_configs.get_model_config('r152x4')
  assert (config.resnet.num_layers, config.resnet.width_factor) == ((3, 8, 36, 3), 4)
  assert 'C10' in catalog.CLAIMS_BY_ID


def test_compiled_flops_per_image_of_a_tiny_model():
  """The claim's compiled count on a small ViT whose matmuls dominate (256 wide, 17 tokens; 1
  and 2 blocks at 1 and 2 images per v3 core, extrapolated to batch 4096): within 10% of the
  analytic matmul count x 3 (XLA also counts norms, softmax and the optimizer; the patch
  embedding needs no input gradient)."""
  config = compute.pretrain_config('micro', 10)
  config.model.hidden_size = config.model.representation_size = 256
  config.model.transformer.mlp_dim, config.model.patches.size = 1024, (8, 8)
  config.pp.resolution = 32
  measured = compute.compiled_flops_per_image(config)
  assert measured == pytest.approx(flops.train_step_flops(config.model, 32, 10), rel=0.1)

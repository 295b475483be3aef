"""vit_jax: Vision Transformer (Dosovitskiy et al., 2020) in JAX/Flax."""
import setuptools

# Pinned so that a fresh install reproduces the tested environment.
JAX_VERSION = '0.10.2'
INSTALL_REQUIRES = [
    f'jax[cpu]=={JAX_VERSION}',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'tensorflow-cpu==2.21.0',
    'tensorflow-datasets==4.9.10',
    'tensorboard==2.21.0',
    'ml-collections==1.1.0',
    'absl-py==2.5.1',
    'numpy>=2.0,<3',
    'scipy>=1.11',
    'tqdm==4.70.1',
    'matplotlib==3.11.2',
    'pillow>=10',
    'importlib_resources>=6',
]

# `pip install -e '.[tpu]'` (Cloud TPU VM) or '.[cuda12]' / '.[cuda13]' (NVIDIA driver >= 525 /
# >= 580): the same JAX with the accelerator's runtime (libtpu, or the CUDA plugin with its CUDA
# and cuDNN wheels). TensorFlow stays the CPU build: it only feeds the input pipeline.
ACCELERATOR_EXTRAS = {name: [f'jax[{name}]=={JAX_VERSION}'] for name in ('tpu', 'cuda12', 'cuda13')}

# The tests compile for Cloud TPU slices with libtpu's compiler (tests/test_plan.py): the `tpu`
# extra's libtpu comes with them (no TPU needed; every other test runs on the CPU backend).
TESTS_REQUIRE = [
    'pytest>=8',
    'pytest-xdist>=3.5',
    *ACCELERATOR_EXTRAS['tpu'],
]

# `python -m vit_jax.benchmark --compare_timm` only (vit_jax.compare_timm); nothing else needs them.
COMPARE_REQUIRE = [
    'torch==2.14.1',
    'timm==1.0.29',
]

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformer (ViT) in JAX/Flax: models, fine-tuning, pre-training, analyses.',
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    package_data={'vit_jax': ['labels/*.txt']},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': TESTS_REQUIRE, 'compare': COMPARE_REQUIRE, **ACCELERATOR_EXTRAS},
)

#!/usr/bin/env bash
# Installs everything and runs the offline demo: pre-train a small ViT on Fashion-MNIST at 21px,
# export it as .npz, fine-tune it at 28px through load_pretrained, evaluate on the test set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/cpu_env.sh
python3 -m vit_jax.demo --workdir="${1:-/tmp/vit_demo}"

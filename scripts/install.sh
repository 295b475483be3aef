#!/usr/bin/env bash
# Installs vit_jax and the offline Fashion-MNIST files (Debian package dataset-fashion-mnist).
# Extra arguments go to pip, e.g. `scripts/install.sh '.[test]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -q dataset-fashion-mnist \
    || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi
python3 -m pip install -q -e "${1:-.}"

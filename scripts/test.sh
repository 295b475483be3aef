#!/usr/bin/env bash
# Installs everything (with the test extras) and runs the whole test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh '.[test]'
source scripts/cpu_env.sh
python3 -m pytest -n 2 --dist loadfile -q --durations=15 tests

#!/usr/bin/env bash
# The CPU comparison with timm of docs/PERFORMANCE.md in one command: ViT-Ti/16 and ViT-S/16,
# fp32, 224, batch 16, train step and inference, ours vs timm in the same process (alternating
# pairs, median ratio; `python -m vit_jax.benchmark --compare_timm`). Three runs with the
# project's XLA:CPU flags (vit_jax/xla_flags.py), then one with XLA's defaults (before), the
# machine's load before each. Writes OUTDIR/{run1,run2,run3,xla_defaults}.json; needs '.[compare]'.
set -euo pipefail
OUTDIR=${1:-/tmp/compare_timm}
cd "$(dirname "$0")/.."
source scripts/cpu_env.sh
mkdir -p "$OUTDIR"
for run in run1 run2 run3 xla_defaults; do
  echo "== $run: $(uptime)"
  if [ "$run" = xla_defaults ]; then export VIT_JAX_NO_CPU_FLAGS=1; fi
  python3 -m vit_jax.benchmark --compare_timm --json_out="$OUTDIR/$run.json" 2>&1 | grep ratio
done

#!/usr/bin/env bash
# One short accelerator run: numerics checks in bf16, train/inference images/s and MFU, timm with
# torch.compile for the ratio, the largest batch that runs (scripts/device_check.py lists the
# parts). Writes OUTDIR/{checks,train,timm,inference,max_batch,summary}.json and
# OUTDIR/device_check.log. At most 8 minutes on one H100/H200 (no part starts after 7).
#
#   scripts/device_check.sh OUTDIR            # on the accelerator
#   scripts/device_check.sh OUTDIR --dry_run  # the same parts on the CPU at a tiny size (tests)
#
# Needs beside JAX, Flax, Optax and numpy: absl-py, and ml_collections (pure Python; needs
# absl-py and PyYAML). Not TensorFlow (the dry run blocks its import to prove it). torch + timm
# are optional (the timm part records an error without them). Where ml_collections is missing,
# it is installed from wheels in .whl/ of the repository root, made beforehand where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "Error: usage: $0 OUTDIR [--dry_run]" >&2
  exit 2
fi
OUTDIR=$1
shift
DRY=()
LIMIT=470
case "${1:-}" in
  --dry_run) DRY=(--dry_run --block_tensorflow); LIMIT=1200 ;;
  "") ;;
  *) echo "Error: unknown argument $1 (expected --dry_run)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  if ! ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
    echo "Error: ml_collections is not installed and .whl/ holds no wheel of it (see $0)" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/device_check_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/device_check_site"
fi
source scripts/cpu_env.sh
set +e
timeout "$LIMIT" python3 scripts/device_check.py --out_dir="$OUTDIR" "${DRY[@]}" 2>&1 \
  | tee "$OUTDIR/device_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ]; then
  echo "device_check: stopped at its $LIMIT s limit" | tee -a "$OUTDIR/device_check.log"
fi
exit "$rc"

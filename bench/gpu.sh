#!/usr/bin/env bash
# The GPU benchmark of issue 27 as ONE command (one device call of <= 8 minutes; see
# bench/gpu_bench.py for what it measures). Needs only torch (no hydra, omegaconf, diffusers,
# torch-fidelity, wandb, mlxtend): run from the repository root, without installing ddpm.
#   bash bench/gpu.sh "$OUT"                                  # on the GPU machine
#   bash bench/gpu.sh --student runs/x/checkpoints/last.ckpt "$OUT"
#   bash bench/gpu.sh --device cpu --tiny /tmp/gpu_check      # the CPU check (seconds)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash bench/gpu.sh [--device cuda|cpu] [--tiny] [--student CKPT] OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
# 7 min 30 s at most: the device call's limit is 8 minutes; the JSON is rewritten after each
# section, so a cut run keeps what it measured
exec timeout 450 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" \
  -m bench.gpu_bench "$@"

#!/usr/bin/env bash
# GPU check (issue 13): smoke notebooks on CUDA, bf16/compile vs fp32 per model family, ViTTM-B/ViT-B latency,
# ViT-B bf16 training share of peak, 2-GPU DDP. Writes results/gpu_check/gpu_check.csv and .md. Refuses without CUDA.
#   scripts/gpu_check.sh [--skip-notebooks] [--no-compile] [--out DIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$TOKENBOOK_ROOT"
export PYTHONHASHSEED=0 CUBLAS_WORKSPACE_CONFIG=:4096:8
exec "$PY" "$TOKENBOOK_ROOT/scripts/gpu_check.py" "$@"

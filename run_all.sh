#!/usr/bin/env bash
# Run every notebook headlessly with papermill and regenerate results/ (README.md, index.html, HTML reports).
#   ./run_all.sh                      # profile 'cpu' (or 'gpu' when CUDA is available), all notebooks
#   ./run_all.sh --profile smoke      # seconds per notebook (what the tests run)
#   ./run_all.sh --only vittm -p epochs 3
#   ./run_all.sh --list               # notebooks and their profiles
# Sets up the environment itself (scripts/env.sh) when none is active.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/env.sh"
cd "$TOKENBOOK_ROOT"
export PYTHONHASHSEED=0 CUBLAS_WORKSPACE_CONFIG=:4096:8
exec "$PY" -m tokenbook.runner "$@"

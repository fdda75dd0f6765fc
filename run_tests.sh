#!/usr/bin/env bash
# The test suite (unit tests + every notebook through papermill with the smoke profile).
#   ./run_tests.sh                 # default: everything not marked slow/gpu
#   ./run_tests.sh -k data -x      # any pytest arguments
#   TOKENBOOK_SLOW=1 ./run_tests.sh   # include slow tests
# Sets up the environment itself (scripts/env.sh) when none is active.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/env.sh"
cd "$TOKENBOOK_ROOT"
export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = "5" ]; then
    echo "run_tests.sh: pytest collected no tests" >&2
    exit 0
fi
exit "$rc"

#!/usr/bin/env bash
# The test suite (unit tests + every notebook through papermill with the smoke profile).
#   ./run_tests.sh                 # default: everything not marked slow/gpu
#   ./run_tests.sh -k data -x      # any pytest arguments
#   TOKENBOOK_SLOW=1 ./run_tests.sh   # include slow tests
# Sets up the environment itself (scripts/env.sh) when none is active.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/env.sh"
cd "$TOKENBOOK_ROOT"
# the report tests open the results site in Debian's Chromium (skipped with a message where it cannot be installed)
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "tokenbook: installing Debian's chromium for the browser test of the reports" >&2
    (apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }) \
        || echo "tokenbook: could not install chromium; the browser test will be skipped" >&2
fi
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

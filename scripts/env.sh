# Sourced by run_all.sh and run_tests.sh: find or create the project's Python environment, install what is missing.
#
# - An active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX) is used as it is.
# - Otherwise the project venv .venv/ is created (python3 -m venv) and reused.
# - `pip install -e .[test]` runs when pyproject.toml changed since the last install (stamp file in the env).
# - The default data (Fashion-MNIST) is installed from Debian's package dataset-fashion-mnist when it is missing
#   and the system allows it (root + apt-get); otherwise a note says how to get it.
set -euo pipefail
TOKENBOOK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TOKENBOOK_ROOT

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ]; then
    PY="$CONDA_PREFIX/bin/python"
else
    if [ ! -x "$TOKENBOOK_ROOT/.venv/bin/python" ]; then
        echo "tokenbook: creating the project environment in .venv/" >&2
        "${PYTHON:-python3}" -m venv "$TOKENBOOK_ROOT/.venv"
    fi
    PY="$TOKENBOOK_ROOT/.venv/bin/python"
fi
export PY

stamp="$("$PY" -c 'import sys; print(sys.prefix)')/.tokenbook-install"
want="$(cat "$TOKENBOOK_ROOT/pyproject.toml" | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! "$PY" -c 'import tokenbook, timm, papermill' 2>/dev/null; then
    echo "tokenbook: installing the package and its pinned dependencies (first run takes a few minutes)" >&2
    "$PY" -m pip install --disable-pip-version-check -q -e "$TOKENBOOK_ROOT[test]" 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    "$PY" -c 'import tokenbook, timm, papermill' || { echo "tokenbook: installation failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi

# default data
if ! "$PY" -c 'from tokenbook.data import find_fashion_mnist; find_fashion_mnist(allow_hub=False)' 2>/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "tokenbook: installing the default data (Debian package dataset-fashion-mnist)" >&2
        (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
            || echo "tokenbook: could not install dataset-fashion-mnist; set TOKENBOOK_FASHION_MNIST=<dir with the IDX files>" >&2
    else
        echo "tokenbook: Fashion-MNIST not found locally: apt-get install dataset-fashion-mnist, or set" \
             "TOKENBOOK_FASHION_MNIST=<dir with the four IDX .gz files>, or go online for the hub copy" >&2
    fi
fi

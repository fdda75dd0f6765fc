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

# Fast when nothing changed (about 0.1 s): a stamp compare and a look-up of the packages without importing them
# (importing timm/torch costs seconds, paid by every call, even one whose arguments are then refused).
stamp="$("$PY" -S -c 'import sys; print(sys.prefix)')/.tokenbook-install"
want="$(sha1sum < "$TOKENBOOK_ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! "$PY" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("tokenbook", "timm", "papermill")))' 2>/dev/null; then
    echo "tokenbook: installing the package and its pinned dependencies (first run takes a few minutes)" >&2
    "$PY" -m pip install --disable-pip-version-check -q -e "$TOKENBOOK_ROOT[test]" 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    "$PY" -c 'import tokenbook, timm, papermill' || { echo "tokenbook: installation failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi

# default data: the four IDX files where tokenbook.data looks first (checked in bash; Python only when missing).
# Keep in step with tokenbook.data's FASHION_MNIST_FILES, FASHION_MNIST_ENV and DEBIAN_FASHION_MNIST.
fmnist_dir="${TOKENBOOK_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
fmnist_ok=1
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$fmnist_dir/$f" ] || fmnist_ok=0
done
if [ "$fmnist_ok" = 1 ]; then
    :
elif ! "$PY" -c 'from tokenbook.data import find_fashion_mnist; find_fashion_mnist(allow_hub=False)' 2>/dev/null; then
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

"""The dataset constants are a leaf module (issue 23): the models read them without importing tokenbook.data."""
import subprocess
import sys


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys\n{stmt}\nprint('\\n'.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_constants_import_nothing():
    mods = _modules_after("import tokenbook.constants")
    assert "torch" not in mods and "numpy" not in mods
    assert {m for m in mods if m.startswith("tokenbook")} == {"tokenbook", "tokenbook.constants"}


def test_models_do_not_import_the_data_package():
    assert "tokenbook.data" not in _modules_after("import tokenbook.models")


def test_data_reexports_the_same_values():
    from tokenbook import constants, data

    for name in constants.__all__:
        assert getattr(data, name) is getattr(constants, name), name
    assert (data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD) == (0.2860, 0.3530)

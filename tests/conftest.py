"""Shared test set-up: offline hub, markers, small data fixtures in the real formats."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENBOOK_HEADLESS", "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    run_slow = os.environ.get("TOKENBOOK_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set TOKENBOOK_SLOW=1 or -m slow"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    """Fashion-MNIST-format IDX files (synthetic, 200 train / 100 test)."""
    from tokenbook.data import write_idx_fixture

    return write_idx_fixture(tmp_path_factory.mktemp("idx"), n_train=200, n_test=100)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny tensors (faster than two on a shared 2-core machine); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENBOOK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


_SMOKE_CACHE: dict = {}


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory):
    """``smoke_results(name) -> (record, folder)``: run notebook ``name`` once per session through the runner with the
    smoke profile (into a temporary results folder) and return its status record and output folder."""
    import json
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("smoke_results")

    def run(name: str):
        if name not in _SMOKE_CACHE:
            out = subprocess.run([sys.executable, "-m", "tokenbook.runner", "--profile", "smoke", "--only", name,
                                  "--results", str(base)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                                 env={**os.environ, "TOKENBOOK_ROOT": str(ROOT)})
            folder = base / name / "smoke"
            status = folder / "status.json"
            if not status.is_file():
                failed = base / name / "smoke-failed"
                log = (failed / "log.txt").read_text()[-4000:] if (failed / "log.txt").is_file() else ""
                raise AssertionError(f"{name} smoke run failed (rc {out.returncode}):\n{out.stdout[-2000:]}\n"
                                     f"{out.stderr[-2000:]}\n{log}")
            _SMOKE_CACHE[name] = (json.loads(status.read_text()), folder)
        return _SMOKE_CACHE[name]

    return run

"""Results per profile (issue 21): a run of one profile never writes another profile's files. The repository's
tracked files are copied to a temporary git repository, the runner runs there with the smoke profile and the
default results folder, and every committed file under results/ must be byte-identical afterwards, with a clean
``git status`` -- after a finished run and after one interrupted by SIGINT a few seconds in."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

NOTEBOOK = "00_baselines"  # the cheapest smoke notebook


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


def _copy_repo(dest: Path) -> Path:
    """The working tree's files that git tracks or would track (as they are now, edits and new files included) in a
    fresh git repository, committed."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout
    dest.mkdir()
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(src.read_bytes())
        os.chmod(dest / rel, src.stat().st_mode & 0o777)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "copy")
    return dest


def _committed_results(root: Path) -> dict[str, str]:
    files = _git(root, "ls-files", "-z", "results").split("\0")
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files if f}


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root / "lib"), "TOKENBOOK_ROOT": str(root)}


def _assert_untouched(root: Path, before: dict[str, str]) -> None:
    after = _committed_results(root)
    changed = sorted(f for f in before if after.get(f) != before[f])
    assert not changed, f"committed results changed: {changed[:10]}"
    status = _git(root, "status", "--porcelain", "--untracked-files=all")
    assert status == "", f"git status is not clean:\n{status}"


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    return _copy_repo(tmp_path_factory.mktemp("site_profiles") / "repo")


def test_smoke_run_writes_only_the_smoke_site(repo_copy):
    root = repo_copy
    before = _committed_results(root)
    assert "results/index.html" in before and "results/claims.csv" in before
    out = subprocess.run([sys.executable, "-m", "tokenbook.runner", "--profile", "smoke", "--only", NOTEBOOK],
                         cwd=root, env=_env(root), capture_output=True, text=True, timeout=900)
    assert out.returncode in (0, 1), out.stdout[-2000:] + out.stderr[-2000:]
    res = root / "results"
    for name in ("index-smoke.html", "README-smoke.md", "claims-smoke.csv", "CLAIMS-smoke.md", "forest-smoke.png",
                 "forest-smoke.csv"):
        assert (res / name).is_file(), name
    index = (res / "index-smoke.html").read_text()
    assert "profile <code>smoke</code>" in index and 'href="index.html"' in index  # says so, links the cpu page
    report = (res / NOTEBOOK / "smoke" / f"{NOTEBOOK}.html").read_text()
    assert "../../index-smoke.html" in report  # its home is its own profile's landing page
    _assert_untouched(root, before)


def test_interrupted_smoke_run_leaves_committed_results_alone(repo_copy):
    root = repo_copy
    before = _committed_results(root)
    proc = subprocess.Popen([sys.executable, "-m", "tokenbook.runner", "--profile", "smoke", "--only", NOTEBOOK],
                            cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((root / "results" / ".staging").glob("*/*/smoke/log.txt")):
            time.sleep(0.2)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    _assert_untouched(root, before)

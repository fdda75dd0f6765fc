"""The batch runner: validation before running, failure isolation, atomic results, summary and index."""
import json
import os
import subprocess
import sys

import nbformat
import pytest

PARAMS = '''profile: str = "cpu"  # run profile
results_root: str = "results"  # results folder
seed: int = 0  # seed
mode: str = "ok"  # ok, fail, die or sleep
value: float = 1.5  # a number written to the table'''

BODY = '''import time
import pandas as pd
from tokenbook.results import RunContext
ctx = RunContext.from_notebook(NAME, globals())
if mode == "fail":
    raise RuntimeError("deliberate failure")
if mode == "die":  # what the kernel sees when the OOM killer strikes
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "sleep":
    time.sleep(60)
ctx.save_table("numbers", pd.DataFrame({"model": ["x"], "value": [value]}))
ctx.finish()'''


def _make_root(tmp_path, names=("00_good", "01_bad", "02_dies")):
    root = tmp_path / "wb"
    (root / "notebooks").mkdir(parents=True)
    (root / "run_all.sh").write_text("#!/bin/sh\n")
    for n in names:
        cells = [nbformat.v4.new_code_cell(PARAMS), nbformat.v4.new_code_cell(BODY.replace("NAME", repr(n)))]
        cells[0].metadata["tags"] = ["parameters"]
        nb = nbformat.v4.new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, str(root / "notebooks" / f"{n}.ipynb"))
        pdir = root / "notebooks" / "params" / n
        pdir.mkdir(parents=True)
        for prof in ("smoke", "cpu"):
            mode = {"01_bad": "fail", "02_dies": "die"}.get(n, "ok")
            (pdir / f"{prof}.yaml").write_text(f"mode: {mode}\n")
    return root


def _run(root, *args, timeout=300):
    env = {**os.environ, "TOKENBOOK_ROOT": str(root)}
    return subprocess.run([sys.executable, "-m", "tokenbook.runner", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_input_refused_before_running(tmp_path):
    root = _make_root(tmp_path)
    out = _run(root, "--profile", "smoke", "-p", "valeu", "2")
    assert out.returncode == 2 and "valeu" in out.stderr and "did you mean 'value'" in out.stderr
    out = _run(root, "--profile", "smoke", "-p", "seed", "abc")
    assert out.returncode == 2 and "'seed' must be int" in out.stderr
    out = _run(root, "--profile", "gpu")
    assert out.returncode == 2 and "profile 'gpu' does not exist" in out.stderr and "smoke" in out.stderr
    out = _run(root, "--profile", "huge")
    assert out.returncode == 2 and "unknown profile" in out.stderr
    out = _run(root, "--only", "nothing")
    assert out.returncode == 2 and "no notebook 'nothing'" in out.stderr
    (root / "notebooks" / "params" / "00_good" / "smoke.yaml").write_text("epochz: 3\n")
    out = _run(root, "--profile", "smoke", "--only", "good")
    assert out.returncode == 2 and "unknown parameter(s) epochz" in out.stderr
    assert not (root / "results").exists()  # nothing ran, nothing written


def test_failure_is_isolated_and_previous_results_kept(tmp_path):
    root = _make_root(tmp_path)
    res = root / "results"
    out = _run(root, "--profile", "cpu", "-p", "value", "2.5")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "00_good" in out.stdout and "01_bad" in out.stdout and "summary" in out.stdout
    good = res / "00_good" / "cpu"
    assert json.loads((good / "status.json").read_text())["status"] == "ok"
    assert "2.5" in (good / "numbers.csv").read_text()
    assert (good / "00_good.html").is_file() and (good / "00_good.ipynb").is_file()
    meta = json.loads((good / "meta.json").read_text())
    assert meta["parameters"]["value"] == 2.5 and meta["profile"] == "cpu"
    failed = res / "01_bad" / "cpu-failed"
    st = json.loads((failed / "status.json").read_text())
    assert st["status"] == "failed" and "deliberate failure" in st["detail"]
    nb = nbformat.read(str(failed / "01_bad.ipynb"), as_version=4)
    assert any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert not (res / "01_bad" / "cpu").exists()
    died = json.loads((res / "02_dies" / "cpu-failed" / "status.json").read_text())
    assert died["status"] == "failed" and died["detail"]
    index = (res / "README.md").read_text()
    assert "00_good" in index and "failed" in index and (res / "index.html").is_file()

    # a later failing run of 00_good keeps its previous good results
    (root / "notebooks" / "params" / "00_good" / "cpu.yaml").write_text("mode: fail\n")
    out = _run(root, "--profile", "cpu", "--only", "00_good")
    assert out.returncode == 1
    assert "2.5" in (good / "numbers.csv").read_text()
    assert json.loads((good / "last_failure.json").read_text())["status"] == "failed"
    assert (res / "00_good" / "cpu-failed" / "00_good.ipynb").is_file()
    assert not (res / ".staging").exists()


def test_time_limit(tmp_path):
    root = _make_root(tmp_path, names=("00_slow",))
    out = _run(root, "--profile", "smoke", "-p", "mode", "sleep", "--timeout", "0.2")
    assert out.returncode == 1
    st = json.loads((root / "results" / "00_slow" / "smoke-failed" / "status.json").read_text())
    assert st["status"] == "timeout"

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
value: float = 1.5  # a number written to the table
epochs: int = 1  # epochs [1, inf)
lr: float = 0.1  # learning rate (0, inf)
prob: float = 0.5  # a probability [0, 1]
dataset: str = "none"  # dataset'''

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
    print("sleeping", flush=True)
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
    assert died["status"] == "failed" and "the kernel was killed by SIGKILL" in died["detail"]  # the launcher saw it
    assert "out of memory" not in died["detail"].replace("no out-of-memory", "")  # no evidence of OOM here
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


def test_scientific_notation_timeout_and_dataset_checks(tmp_path):
    root = _make_root(tmp_path, names=("00_good",))
    out = _run(root, "--profile", "smoke", "-p", "value", "1e-3", "-p", "seed", "1e3", "-p", "dataset",
               "folder:/nonexistent/tokenbook")
    # the numbers pass; the dataset is refused before any kernel starts
    assert out.returncode == 2 and "must be" not in out.stderr, out.stderr
    assert "image folder /nonexistent/tokenbook does not exist" in out.stderr
    (root / "notebooks" / "params" / "00_good" / "smoke.yaml").write_text("mode: ok\nvalue: 5e-4\n")
    out = _run(root, "--profile", "smoke", "-p", "seed", "1.5e0")
    assert out.returncode == 2 and "'seed' must be int, got float 1.5 (not a whole number)" in out.stderr
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)
    out = _run(root, "--profile", "smoke", "-p", "dataset", f"folder:{half}")
    assert out.returncode == 2 and "has no 'val/' sub-folder" in out.stderr
    out = _run(root, "--profile", "smoke", "-p", "dataset", "hf:/nonexistent/copy")
    assert out.returncode == 2 and "/nonexistent/copy" in out.stderr and "does not exist" in out.stderr
    for bad in ("0", "-1", "nan"):
        out = _run(root, "--profile", "smoke", "--timeout", bad)
        assert out.returncode == 2 and "--timeout: must be a positive number of minutes" in out.stderr, bad
    assert not (root / "results").exists()
    (half / "val").mkdir()
    out = _run(root, "--profile", "smoke", "-p", "dataset", f"folder:{half}")
    assert out.returncode == 0, out.stdout + out.stderr
    meta = json.loads((root / "results" / "00_good" / "smoke" / "meta.json").read_text())
    assert meta["parameters"]["value"] == 5e-4 and meta["parameters"]["dataset"] == f"folder:{half}"


def test_fashion_mnist_checked_before_running(tmp_path, monkeypatch):
    from tokenbook import data
    from tokenbook.runner import check_dataset

    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.find_fashion_mnist()
    assert check_dataset({"dataset": "fashion_mnist"}) == str(e.value)  # the same message as tokenbook.data
    assert check_dataset({"dataset": "hf:uoft-cs/cifar100"}) is None  # hub ids need the net: not checked


def test_error_summary_names_signal_and_oom_only_on_evidence(tmp_path):
    from tokenbook.runner import _error_summary

    nb, log = tmp_path / "x.ipynb", tmp_path / "log.txt"
    log.write_text("nbclient.exceptions.DeadKernelError: Kernel died\n")
    died = _error_summary(nb, log, 138, 0, 0)
    assert "the kernel died" in died and "no out-of-memory evidence" in died
    assert "out of memory (the cgroup's oom_kill counter rose from 0 to 1)" in _error_summary(nb, log, 138, 0, 1)
    assert _error_summary(nb, log, -15, 0, 0) == "papermill killed by SIGTERM"
    assert _error_summary(nb, log, -9, None, None) == "papermill killed by SIGKILL"
    assert "SIGKILL: out of memory" in _error_summary(nb, log, -9, 3, 4)
    # with the kernel launcher's record: the signal is named, OOM only with evidence
    assert _error_summary(nb, log, 138, 0, 0, kernel={"signal": "SIGTERM"}) == "the kernel was killed by SIGTERM"
    assert "killed by SIGKILL (no out-of-memory evidence" in _error_summary(nb, log, 138, 0, 0,
                                                                            kernel={"signal": "SIGKILL"})
    assert "SIGKILL: out of memory" in _error_summary(nb, log, 138, 0, 1, kernel={"signal": "SIGKILL"})
    log.write_text("Killed: Out of memory: Killed process 123 (python)\n")
    assert "out of memory (the log says 'out of memory')" in _error_summary(nb, log, -9, None, None)


def test_ctrl_c_prints_summary_cleans_staging_and_exits_130(tmp_path):
    import signal
    import time

    root = _make_root(tmp_path, names=("00_slow", "01_next"))
    (root / "notebooks" / "params" / "00_slow" / "smoke.yaml").write_text("mode: sleep\n")
    env = {**os.environ, "TOKENBOOK_ROOT": str(root)}
    # a test suite started as a background job of a non-interactive shell inherits SIGINT ignored, and Python keeps
    # an ignored SIGINT ignored: give the runner the default disposition, as a terminal's Ctrl-C would find it
    proc = subprocess.Popen([sys.executable, "-m", "tokenbook.runner", "--profile", "smoke"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        logs = []
        while time.time() < deadline and not any("sleeping" in p.read_text() for p in logs):
            time.sleep(0.5)
            logs = list((root / "results" / ".staging").glob("*/00_slow/smoke/log.txt"))
        assert logs, "the notebook did not start"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "summary" in out and "interrupted" in out and "not run" in out and "01_next" in out
    res = root / "results"
    assert not (res / ".staging").exists()
    # the smoke profile's own site, never the committed cpu one
    assert (res / "README-smoke.md").is_file() and (res / "index-smoke.html").is_file()
    assert not (res / "README.md").exists() and not (res / "index.html").exists()
    assert not (res / "00_slow" / "smoke").exists()


def test_gitignore_covers_checkpoints_failed_runs_and_staging():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = ["notebooks/.ipynb_checkpoints/03_toe-checkpoint.ipynb", "results/03_toe/cpu-failed/03_toe.ipynb",
             "results/03_toe/smoke-failed/log.txt", "results/.staging/x/log.txt"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(paths)
    kept = subprocess.run(["git", "check-ignore", "--no-index", "results/03_toe/cpu/03_toe.ipynb"], cwd=root,
                          capture_output=True, text=True)
    assert kept.returncode == 1  # cpu-profile results are committed


def test_env_sh_fast_path_matches_tokenbook_data():
    # scripts/env.sh checks the default data in bash (no torch import per call); its names must match tokenbook.data
    from pathlib import Path

    from tokenbook import data

    text = (Path(__file__).resolve().parents[1] / "scripts" / "env.sh").read_text()
    for f in data.FASHION_MNIST_FILES.values():
        assert f in text
    assert f"${{{data.FASHION_MNIST_ENV}:-{data.DEBIAN_FASHION_MNIST}}}" in text
    assert "import tokenbook, timm, papermill' 2>/dev/null; then" not in text  # no imports when the stamp matches


def test_kernel_launcher_records_the_signal_and_dies_with_its_manager(tmp_path):
    """The runner's kernel launcher: a kernel killed by a signal is recorded with that signal; and when the kernel
    manager (papermill) dies, the kernel is ended instead of being left behind."""
    import time

    status = tmp_path / "status.json"
    env = {**os.environ, "TOKENBOOK_KERNEL_STATUS": str(status)}
    killed = subprocess.run([sys.executable, "-c", "import sys; from tokenbook.kernel_launcher import run; "
                             "sys.exit(run([sys.executable, '-c', 'import os, signal; "
                             "os.kill(os.getpid(), signal.SIGTERM)']))"], env=env, timeout=60)
    assert killed.returncode == 128 + 15
    assert json.loads(status.read_text())["signal"] == "SIGTERM"
    # a manager that starts the launcher and dies at once: the kernel (sleeping 120 s) must end within seconds
    pidfile = tmp_path / "kernel.pid"
    manager = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import sys; from tokenbook.kernel_launcher import run; sys.exit(run([sys.executable, \"-c\", "
               f"\"import os, time; open(r\\\\\"{pidfile}\\\\\", \\\\\"w\\\\\").write(str(os.getpid())); "
               "time.sleep(120)\"]))']); time.sleep(4)")
    subprocess.run([sys.executable, "-c", manager], env=env, timeout=60)
    for _ in range(100):
        if pidfile.is_file() and pidfile.read_text():
            break
        time.sleep(0.1)
    _ends_within(int(pidfile.read_text()), 15.0, "the kernel outlived its manager")


def _ends_within(pid: int, seconds: float, failure: str) -> None:
    """Wait until process ``pid`` is gone; past ``seconds`` kill it and fail with ``failure``."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail(failure)


def test_kernel_launcher_ends_what_the_kernel_left_running(tmp_path):
    """A kernel that spawned a training process and ended (killed by the runner's time limit, or done) does not leave
    that process running: the launcher leads the kernel's process group and ends the rest of it."""
    pidfile = tmp_path / "orphan.pid"
    kernel = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open(r'{pidfile}', 'w').write(str(p.pid))")
    launcher = ("import sys; from tokenbook.kernel_launcher import run; "
                f"sys.exit(run([sys.executable, '-c', {kernel!r}]))")
    done = subprocess.run([sys.executable, "-c", launcher], timeout=60, start_new_session=True)  # as jupyter_client
    assert done.returncode == 0
    _ends_within(int(pidfile.read_text()), 10.0, "the kernel's child outlived the kernel")
    # run by hand (not a group leader), the launcher leaves its group alone
    from tokenbook.kernel_launcher import end_group

    assert os.getpgrp() != os.getpid() and end_group() == []


# ----------------------------------------------------------------------------------------------------------
# rough edges (issue 22): file modes, an unwritable results folder, parameter ranges, two runs at once
# ----------------------------------------------------------------------------------------------------------
def _snapshot(folder):
    from pathlib import Path

    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_written_files_get_the_mode_the_umask_implies(tmp_path):
    from tokenbook.io import atomic_write

    old = os.umask(0o022)
    try:
        assert oct(atomic_write(tmp_path / "a.txt", "x").stat().st_mode & 0o777) == oct(0o644)
        os.umask(0o027)
        assert oct(atomic_write(tmp_path / "b.bin", b"x").stat().st_mode & 0o777) == oct(0o640)
        assert oct(atomic_write(tmp_path / "a.txt", "y").stat().st_mode & 0o777) == oct(0o640)  # a rewrite too
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_unwritable_results_folder_is_refused_before_running(tmp_path):
    root = _make_root(tmp_path, names=("00_good",))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = _run(root, "--profile", "smoke", "--results", str(blocker / "results"))
    _one_line_error(out, f"results folder {blocker / 'results'} cannot be created", f"{blocker} is not a folder")
    out = _run(root, "--profile", "smoke", "--results", str(blocker))
    _one_line_error(out, f"{blocker} is not a folder")
    assert blocker.read_text() == "not a folder" and not (root / "results").exists()


def test_unwritable_results_folder_without_root_rights(tmp_path):
    from tokenbook.runner import check_results_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        problem = check_results_dir(ro / "results")
        if os.geteuid() == 0:  # root writes through permission bits: the probe agrees, the check must not refuse
            assert problem is None
        else:
            assert problem and "is not writable" in problem
    finally:
        ro.chmod(0o755)
    assert check_results_dir(tmp_path / "new" / "results") is None and not (tmp_path / "new").exists()


@pytest.mark.parametrize("name,value,shown,rng", [
    ("epochs", "-3", "-3", "[1, inf)"), ("epochs", "0", "0", "[1, inf)"), ("lr", "-1", "-1.0", "(0, inf)"),
    ("lr", "0", "0.0", "(0, inf)"), ("prob", "1.5", "1.5", "[0, 1]"), ("prob", "-0.1", "-0.1", "[0, 1]"),
])
def test_out_of_range_parameters_are_refused_before_a_kernel_starts(tmp_path, name, value, shown, rng):
    root = _make_root(tmp_path, names=("00_good",))
    out = _run(root, "--profile", "smoke", "-p", name, value)
    _one_line_error(out, f"00_good (-p {name}): parameter '{name}' = {shown} is out of its range {rng}")
    assert not (root / "results").exists()


def test_out_of_range_value_in_a_profile_file_names_the_file(tmp_path):
    root = _make_root(tmp_path, names=("00_good",))
    (root / "notebooks" / "params" / "00_good" / "smoke.yaml").write_text("mode: ok\nprob: 2\n")
    out = _run(root, "--profile", "smoke")
    _one_line_error(out, "notebooks/params/00_good/smoke.yaml", "'prob' = 2.0 is out of its range [0, 1]")
    # a default outside its own range is refused too, naming the notebook
    (root / "notebooks" / "params" / "00_good" / "smoke.yaml").write_text("mode: ok\n")
    nb = root / "notebooks" / "00_good.ipynb"
    nb.write_text(nb.read_text().replace("epochs: int = 1  # epochs [1, inf)", "epochs: int = 0  # epochs [1, inf)"))
    out = _run(root, "--profile", "smoke")
    _one_line_error(out, "00_good (default in notebooks/00_good.ipynb): parameter 'epochs' = 0 is out of its range")
    assert not (root / "results").exists()


def test_every_notebook_declares_ranges_and_its_defaults_and_profiles_are_within_them():
    import ast
    from pathlib import Path

    from tokenbook.results import check_param_range, notebook_parameters, parameter_range
    from tokenbook.runner import list_notebooks, resolve_parameters

    root = Path(__file__).resolve().parents[1]
    unranged = {("01_vittm", "head_map_layer")}  # negative counts from the end: every int is meaningful
    for nb in list_notebooks(root):
        specs = notebook_parameters(nb, root / "notebooks" / f"{nb}.ipynb")
        for k, s in specs.items():
            if s["type"] not in ("int", "float"):
                continue
            if (nb, k) in unranged:
                assert parameter_range(s["help"]) is None
                continue
            assert parameter_range(s["help"]) is not None, f"{nb}: {k} declares no range in its comment"
            check_param_range(k, ast.literal_eval(s["default"]), s["help"])  # the default is within it
        for pfile in sorted((root / "notebooks" / "params" / nb).glob("*.yaml")):
            resolve_parameters(root, nb, pfile.stem, {})  # every profile's values are within the ranges


def test_two_runs_into_one_results_folder(tmp_path):
    import time

    root = _make_root(tmp_path, names=("00_good",))
    res = root / "results"
    res.mkdir()
    (res / "keep.txt").write_text("kept")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tokenbook.runner import ResultsLock; "
                               f"ResultsLock({str(res)!r}, 'cpu').acquire(); print('locked', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENBOOK_ROOT": str(root)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(res)
        out = _run(root, "--profile", "smoke")
        _one_line_error(out, f"results folder {res} is in use by another run", f"pid {holder.pid}", "profile cpu",
                        "started 20")
        assert _snapshot(res) == before
        out = _run(root, "--profile", "smoke", "--rebuild-site")
        _one_line_error(out, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    out = _run(root, "--profile", "smoke")  # the holder died: its lock went with it
    assert out.returncode == 0, out.stdout + out.stderr
    assert (res / "keep.txt").read_text() == "kept" and (res / "index-smoke.html").is_file()


def test_rebuild_site_runs_nothing(tmp_path):
    root = _make_root(tmp_path, names=("00_good",))
    res = tmp_path / "res"
    out = _run(root, "--profile", "cpu", "--only", "00_good", "--results", str(res))
    assert out.returncode == 0, out.stdout + out.stderr
    (res / "index.html").unlink()
    before = (res / "00_good" / "cpu" / "status.json").read_text()
    out = _run(root, "--profile", "cpu", "--rebuild-site", "--results", str(res))
    assert out.returncode == 0 and "rebuilt:" in out.stdout and "-->" not in out.stdout, out.stdout + out.stderr
    assert (res / "index.html").is_file() and (res / "00_good" / "cpu" / "status.json").read_text() == before

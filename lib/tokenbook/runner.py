"""Batch runner behind ``./run_all.sh``: every notebook through papermill under a profile, then reports.

``python -m tokenbook.runner [--profile cpu] [--only NAME ...] [-p key value ...] [--timeout MIN] [--results DIR]``

For each ``notebooks/NN_name.ipynb`` (in order):

1. parameters come from ``notebooks/params/<name>/<profile>.yaml`` plus ``-p`` overrides (typed like the parameters
   cell's annotations); unknown or mistyped names and missing profiles are refused before anything runs;
2. papermill executes it in a child process with an explicit kernel, the repository root as working directory,
   logged output (``log.txt``) and a per-notebook time limit, writing into a staging folder;
3. on success the staged folder replaces ``results/<name>/<profile>/`` atomically (an HTML report is rendered with
   nbconvert); on failure the previous results stay untouched and the executed notebook with the error goes to
   ``results/<name>/<profile>-failed/``. Other notebooks still run;
4. at the end a summary (notebook, status, minutes) is printed, the profile's claims ledger and results site are
   regenerated (:func:`tokenbook.report.write_index`), and the exit status is non-zero if any notebook failed.

Results per profile: a run writes only its own profile's files. The committed ``cpu`` profile owns
``results/index.html``, ``README.md``, ``claims.csv``, ``CLAIMS.md``, ``forest.png`` and ``forest.csv``; any other
profile ``p`` writes ``index-p.html``, ``README-p.md``, ``claims-p.csv``, ``CLAIMS-p.md``, ``forest-p.png``,
``forest-p.csv`` (:func:`tokenbook.io.site_file`; the smoke ones are git-ignored), also when interrupted.

Before anything runs: parameter names, types and ranges (``[>= 1]``, ``[0, 1)`` suffixes of the parameters cell's
comments, :func:`tokenbook.results.parameter_range`), datasets, and that the results folder is writable; then the
runner takes a lock on the results folder (``<results>/.lock``, ``fcntl.flock``; released when the process ends):
a second run into the same folder names the holder (pid, start, profile) and exits 2. Every such error is one line
on stderr, exit status 2, nothing in the results folder changed.

``--rebuild-site``: no notebook runs; the profile's ledger and site are rebuilt from the results on disk
(``python -m tokenbook.runner --rebuild-site --profile cpu``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from .io import atomic_write, site_file
from .report import render_html, write_index
from .results import repo_root, swap_in

PROFILES = ("smoke", "cpu", "gpu", "full")
RESERVED = ("profile", "results_root")
DEFAULT_TIMEOUT_MIN = {"smoke": 5, "cpu": 30, "gpu": 240, "full": 10_000}


class RunnerError(ValueError):
    """Bad runner input (unknown notebook, profile or parameter)."""


def list_notebooks(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def coerce(value: str):
    """Type a ``-p`` value as YAML does: true/false/none, int, float, a list (``"[0, 1, 2]"``), else string.

    Scientific notation (``1e-3``), which YAML 1.1 reads as a string, is typed against the notebook's
    :class:`~tokenbook.params.Params` later (:func:`tokenbook.results.check_param_type`): a float where a float is
    expected, an int only if integral.
    """
    try:
        v = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(v, list) and all(isinstance(x, (int, float, bool, str)) for x in v):
        return v
    return v if isinstance(v, (int, float, bool, str)) or v is None else value


def notebook_params(name: str, root: Optional[Path] = None):
    """The :class:`~tokenbook.params.Params` class of notebook ``name``: its experiments module's, or, for a
    notebook without one, a class read from its own parameters cell; a RunnerError says why neither exists."""
    import importlib.util

    from .params import cell_params_class, module_name, params_class

    try:
        if importlib.util.find_spec(module_name(name)) is not None:
            return params_class(name)
        return cell_params_class(name, (root or repo_root()) / "notebooks" / f"{name}.ipynb")
    except (ImportError, ValueError, FileNotFoundError) as e:
        raise RunnerError(f"{name}: no parameters ({e})") from e


def profile_parameters(root: Path, name: str, profile: str, overrides: Optional[dict] = None):
    """Every parameter of notebook ``name`` as a run with ``profile`` sees it: a validated
    :class:`~tokenbook.params.Params` (its defaults, overlaid with the profile's YAML and ``overrides``)."""
    values = {"profile": profile, **resolve_parameters(root, name, profile, dict(overrides or {}))}
    return notebook_params(name, root).from_mapping(values, where=name)


#: ``${NAME}`` or ``${NAME:-default}`` in a profile's string values (the ``full`` profiles' data paths,
#: ``${TOKENBOOK_DATA:-/data}/imagenet``), expanded from the environment when the runner reads the YAML
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: the environment variable that holds the data root of the ``full`` profiles (``run_all.sh --data-root DIR``)
DATA_ROOT_ENV = "TOKENBOOK_DATA"


def expand_env(value, where: str = ""):
    """``value`` with every ``${NAME}`` / ``${NAME:-default}`` in its strings (lists included) replaced from the
    environment; an unset variable without a default is a RunnerError naming it."""
    if isinstance(value, list):
        return [expand_env(v, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m):
        v = os.environ.get(m.group(1))
        if v is None or (v == "" and m.group(2) is not None):
            if m.group(2) is None:
                raise RunnerError(f"{where}: {m.group(0)} is not set in the environment (write ${{{m.group(1)}:-"
                                  "default}} for a default)")
            return m.group(2)
        return v

    return _ENV_REF.sub(sub, value)


def proof_overrides(cls, overrides: Optional[dict] = None) -> dict:
    """What ``run_all.sh --proof`` sets for a notebook whose parameters are ``cls``: ``max_steps`` 2, then the
    class's :attr:`~tokenbook.params.Params.PROOF` overrides (devices, precision, batch, latency budgets), then
    the user's own ``-p`` (which win)."""
    return {"max_steps": 2, **cls.PROOF, **(overrides or {})}


def _proof_weights(notebooks: list[str], data_root: Path) -> list[str]:
    """Each selected notebook's experiments-module hook ``proof_data(data_root) -> list[str]`` (the synthetic weight
    files its full profile names, under their official key names), found by stem; what was written."""
    import importlib

    from .params import module_name

    written = []
    for n in notebooks:
        try:
            mod = importlib.import_module(module_name(n))
        except ImportError:
            continue
        hook = getattr(mod, "proof_data", None)
        if hook is not None:
            written += [w for w in hook(data_root) if w not in written]
    return written


def resolve_parameters(root: Path, name: str, profile: str, overrides: dict) -> dict:
    """The parameters one notebook run sets (the profile's YAML plus ``overrides``), validated against the
    notebook's :class:`~tokenbook.params.Params`: names, types (YAML lists for lists) and ranges. Returns the values
    as papermill injects them (typed, sentinels such as 0 kept as written)."""
    from .params import ParamsError, unknown_hints

    cls = notebook_params(name, root)
    pdir = root / "notebooks" / "params" / name
    pfile = pdir / f"{profile}.yaml"
    if not pfile.is_file():
        have = sorted(p.stem for p in pdir.glob("*.yaml")) if pdir.is_dir() else []
        raise RunnerError(f"{name}: profile {profile!r} does not exist (no {pfile.relative_to(root)}); "
                          f"available profiles: {', '.join(have) or 'none'}")
    try:
        params = yaml.safe_load(pfile.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunnerError(f"{pfile}: invalid YAML ({e})") from e
    if not isinstance(params, dict):
        raise RunnerError(f"{pfile}: must be a mapping of parameter names to values")
    params = {k: expand_env(v, f"{pfile.relative_to(root)}: {k}") for k, v in params.items()}
    specs = cls.specs()
    unknown = sorted((set(params) | set(overrides)) - set(specs))
    if unknown:
        raise RunnerError(f"{name}: unknown parameter(s) {unknown_hints(unknown, specs)}; the notebook's parameters "
                          f"are: {', '.join(sorted(specs))}")
    try:  # the defaults first, then the profile alone, so that an error names the file it comes from
        cls()
    except ParamsError as e:
        raise RunnerError(f"{name} (default in notebooks/{name}.ipynb): {e}") from e
    try:
        cls(**params)
    except ParamsError as e:
        raise RunnerError(f"{name} ({pfile.relative_to(root)}): {e}") from e
    try:
        typed = cls(**{**params, **overrides}).to_dict()
    except ParamsError as e:
        raise RunnerError(f"{name} ({', '.join(f'-p {k}' for k in overrides)}): {e}") from e
    return {k: typed[k] for k in {**params, **overrides}}


def _positive_minutes(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of minutes, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text!r}")
    return v


def check_dataset(params: dict) -> Optional[str]:
    """What can be checked about a run's ``dataset`` parameter before the kernel starts; the problem, or None.

    ``folder:<path>``: the folder exists with ``train/`` and ``val/``; ``fashion_mnist``: it resolves (local IDX
    files, Debian package, or the hub when online), with :func:`tokenbook.data.find_fashion_mnist`'s message;
    ``hf:<path>``: a local path (``/``, ``./``, ``../``, ``~``) exists. Hub ids are not checked (that needs the net).
    """
    ds = params.get("dataset")
    if not isinstance(ds, str):
        return None
    if ds.startswith("folder:"):
        root = Path(ds[len("folder:"):]).expanduser()
        if not root.is_dir():
            return (f"image folder {root} does not exist (expected {root}/train/<class>/*.jpg and "
                    f"{root}/val/<class>/*.jpg)")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                return (f"image folder {root} has no '{split}/' sub-folder (ImageNet layout: "
                        "train/<class>/..., val/<class>/...)")
        return None
    if ds.startswith("hf:"):
        target = ds[len("hf:"):]
        if target.startswith(("/", "./", "../", "~")) and not Path(target).expanduser().exists():
            return f"local dataset copy {target} (dataset {ds!r}) does not exist"
        return None
    if ds == "fashion_mnist":
        from .data import DatasetNotFoundError, find_fashion_mnist

        try:
            find_fashion_mnist(params.get("data_dir") or None)
        except DatasetNotFoundError as e:
            return str(e)
    return None


#: cgroup files whose ``oom_kill`` counter tells that the kernel's OOM killer struck (v2, then v1)
OOM_EVENT_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")


def _oom_kills() -> Optional[int]:
    """The cgroup's ``oom_kill`` counter (this process's cgroup first), or None when it cannot be read."""
    paths = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrl, path = line.split(":", 2)
            if hid == "0" and ctrl == "":
                paths.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.events")
            elif "memory" in ctrl.split(","):
                paths.append(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.oom_control")
    except (OSError, ValueError):
        pass
    for p in (*paths, *OOM_EVENT_FILES):
        try:
            for line in Path(p).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "oom_kill":
                    return int(v)
        except (OSError, ValueError):
            continue
    return None


_OOM_LOG_MARKERS = ("out of memory", "outofmemoryerror", "memoryerror", "oom-kill", "oom_kill",
                    "cannot allocate memory")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


KERNEL_NAME = "tokenbook-python3"


def _kernel_name() -> str:
    """The kernel papermill uses: this interpreter's ipykernel (the venv's), behind ``tokenbook.kernel_launcher``."""
    return KERNEL_NAME


def _write_kernelspec(where: Path) -> Path:
    """A kernelspec folder (``<where>/kernels/tokenbook-python3``) whose kernel is this interpreter's ipykernel,
    started through :mod:`tokenbook.kernel_launcher` so the runner learns the signal that ended a dead kernel.
    Returns the folder to put on ``JUPYTER_PATH``."""
    spec = where / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    atomic_write(spec / "kernel.json", json.dumps({
        "argv": [sys.executable, "-m", "tokenbook.kernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python", "metadata": {"debugger": False}}))
    return where


def run_notebook(root: Path, name: str, profile: str, params: dict, results_dir: Path, timeout_min: float) -> dict:
    """Execute one notebook; returns its status record."""
    stage_root = results_dir / ".staging" / f"{name}-{profile}-{os.getpid()}"
    shutil.rmtree(stage_root, ignore_errors=True)
    stage = stage_root / name / profile
    stage.mkdir(parents=True)
    out_nb = stage / f"{name}.ipynb"
    pfile = stage / "parameters.yaml"
    params = {**params, "profile": profile, "results_root": _rel(stage_root, root)}
    pfile.write_text(yaml.safe_dump(params, sort_keys=True))
    # paths relative to the repository root (papermill runs there): no machine paths end up in the reports
    cmd = [sys.executable, "-m", "papermill", f"notebooks/{name}.ipynb", _rel(out_nb, root),
           "-f", _rel(pfile, root), "-k", _kernel_name(), "--cwd", ".", "--log-output", "--no-progress-bar",
           "--request-save-on-cell-execute", "--autosave-cell-every", "20"]
    env = {**os.environ, "PYTHONHASHSEED": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "TOKENBOOK_HEADLESS": "1",
           "TOKENBOOK_ROOT": str(root), "TOKENBOOK_PROFILE": profile, "MPLBACKEND": "Agg",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           # where the results will be once swapped in (RunContext.where shows this instead of the staging folder)
           "TOKENBOOK_RESULTS_DISPLAY": _rel(results_dir, root),
           "PYTHONWARNINGS": "ignore:IProgress not found"}
    env["JUPYTER_PATH"] = os.pathsep.join(
        [str(_write_kernelspec(stage_root / "jupyter"))] + ([os.environ["JUPYTER_PATH"]] if os.environ.get(
            "JUPYTER_PATH") else []))
    env["TOKENBOOK_KERNEL_STATUS"] = str(stage_root / "kernel_status.json")
    t0 = time.time()
    oom_before = _oom_kills()
    status, detail = "failed", ""
    with open(stage / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_min * 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status, detail = -9, "timeout", f"exceeded the {timeout_min:g} min limit"
        except BaseException:  # Ctrl-C or a kill of the runner: take the notebook's kernel down with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            shutil.rmtree(stage_root, ignore_errors=True)
            _remove_empty_staging(results_dir)
            raise
    minutes = (time.time() - t0) / 60
    if status != "timeout":
        if rc == 0:
            status = "ok"
        else:
            status = "failed"
            detail = _error_summary(out_nb, stage / "log.txt", rc, oom_before, _oom_kills(),
                                    kernel=_read_json(stage_root / "kernel_status.json"))
    if out_nb.is_file():
        _restore_kernelspec(out_nb)
    record = {"notebook": name, "profile": profile, "status": status, "minutes": round(minutes, 2),
              "detail": detail, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(stage / "status.json", json.dumps(record, indent=2))
    if out_nb.is_file():
        meta = _read_json(stage / "meta.json")
        git = meta.get("git", {}) or {}
        render_html(out_nb, home=f"../../{site_file('index.html', profile)}", meta_line=f"{name} · profile {profile} · {status} in {minutes:.2f} min · commit "
                                      f"{(git.get('commit') or '?')[:10]} ({'dirty' if git.get('dirty') else 'clean'})")
    final = results_dir / name / profile
    if status == "ok":
        swap_in(stage, final)
        failed = results_dir / name / f"{profile}-failed"
        shutil.rmtree(failed, ignore_errors=True)
    else:
        swap_in(stage, results_dir / name / f"{profile}-failed")
        if final.is_dir():  # keep the previous good results, but record that the latest run failed
            atomic_write(final / "last_failure.json", json.dumps(record, indent=2))
    shutil.rmtree(stage_root, ignore_errors=True)
    _remove_empty_staging(results_dir)
    return record


def _remove_empty_staging(results_dir: Path) -> None:
    try:
        (results_dir / ".staging").rmdir()
    except OSError:  # absent, or another run is still staging there
        pass


class Terminated(BaseException):
    """SIGTERM of the runner (handled like Ctrl-C: summary, index, cleanup; exit 143)."""


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it is inside it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _restore_kernelspec(nb_path: Path) -> None:
    """The executed notebook names the plain ``python3`` kernel (the launcher is the runner's business)."""
    try:
        nb = json.loads(nb_path.read_text())
        ks = nb.get("metadata", {}).get("kernelspec", {})
        if ks.get("name") == KERNEL_NAME:
            ks.update(name="python3", display_name="Python 3 (ipykernel)")
            pm = nb["metadata"].get("papermill", {})
            if pm.get("kernel_name") == KERNEL_NAME:
                pm["kernel_name"] = "python3"
            atomic_write(nb_path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    except (OSError, ValueError):
        pass


def _error_summary(nb_path: Path, log_path: Path, rc: int, oom_before: Optional[int] = None,
                   oom_after: Optional[int] = None, kernel: Optional[dict] = None) -> str:
    """One line on why a run failed. Out of memory is named only on evidence: the cgroup's ``oom_kill`` counter
    rose during the run, or the log says so; otherwise a killed process is reported with its signal."""
    try:
        log_text = log_path.read_text(errors="replace")
    except OSError:
        log_text = ""
    oom = []
    if oom_before is not None and oom_after is not None and oom_after > oom_before:
        oom.append(f"the cgroup's oom_kill counter rose from {oom_before} to {oom_after}")
    low = log_text.lower()
    marker = next((m for m in _OOM_LOG_MARKERS if m in low), None)
    if marker:
        oom.append(f"the log says {marker!r}")
    if rc < 0:  # papermill itself was killed
        sig = _signal_name(-rc)
        if oom and -rc == signal.SIGKILL:
            return f"papermill killed by SIGKILL: out of memory ({'; '.join(oom)})"
        return f"papermill killed by {sig}"
    dead = rc == 138 or "DeadKernelError" in log_text
    ksig = (kernel or {}).get("signal")
    if dead and ksig:  # tokenbook.kernel_launcher saw how the kernel ended
        if ksig == "SIGKILL" and oom:
            return f"the kernel was killed by SIGKILL: out of memory ({'; '.join(oom)})"
        return (f"the kernel was killed by {ksig}" + (" (no out-of-memory evidence: cgroup oom_kill counter "
                + ("unchanged" if oom_before is not None else "not readable") + ", no OOM in the log)"
                if ksig == "SIGKILL" else ""))
    if dead:  # papermill exits 138 when the kernel dies; without the launcher's record the signal is unknown
        if oom:
            return f"the kernel died: out of memory ({'; '.join(oom)})"
        return ("the kernel died (killed by a signal or crashed; papermill does not report which) and there is no "
                "out-of-memory evidence (cgroup oom_kill counter " +
                ("unchanged" if oom_before is not None else "not readable") + ", no OOM in the log)")
    try:
        import nbformat

        nb = nbformat.read(str(nb_path), as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    return f"{out.get('ename')}: {out.get('evalue')}"[:500]
    except Exception:
        pass
    tail = log_text.strip().splitlines()[-3:]
    return " | ".join(tail)[:500] if tail else f"exit code {rc}"


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------------------
# the results folder: writable, and one run at a time
# ----------------------------------------------------------------------------------------------------------
def check_results_dir(results_dir: Path) -> Optional[str]:
    """Can the runner write into ``results_dir``? The problem in one line, or None. Checked before anything runs,
    without creating anything: the nearest existing ancestor must be a folder (a path under a regular file fails
    for root too) and writable (``os.access``, plus a probe file that is removed at once when the folder exists, so
    that a read-only mount is caught whoever runs)."""
    import tempfile

    results_dir = Path(results_dir)
    p = results_dir
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        return f"results folder {results_dir} cannot be created: {p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"results folder {results_dir} is not writable ({p} does not allow writing)"
    if p == results_dir:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return f"results folder {results_dir} is not writable ({e.strerror or e})"
    return None


class LockHeld(RuntimeError):
    """Another run holds the results folder's lock."""


class ResultsLock:
    """An exclusive ``fcntl.flock`` on ``<results>/.lock`` for the whole run; the kernel releases it when the process
    ends, however it ends. The file records the holder (pid, start time, profile) for the message a second run
    prints; it is git-ignored and left in place (removing it would race with a waiting run)."""

    NAME = ".lock"

    def __init__(self, results_dir: Path, profile: str):
        self.path = Path(results_dir) / self.NAME
        self.profile = profile
        self.fd: Optional[int] = None

    def acquire(self) -> "ResultsLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise LockHeld(f"results folder {self.path.parent} is in use by another run (pid "
                           f"{holder.get('pid', '?')}, started {holder.get('started_utc', '?')}, profile "
                           f"{holder.get('profile', '?')}); wait for it to finish or use --results DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "profile": self.profile,
                                  "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "ResultsLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def _write_ledger(results_dir: Path, root: Path, profile: str) -> None:
    """The profile's claims ledger (``claims.csv`` / ``CLAIMS.md`` for cpu, ``claims-<profile>.csv`` /
    ``CLAIMS-<profile>.md`` otherwise) over every notebook's results of ``profile`` on disk:
    a notebook not run this time keeps the verdicts of its last run; one that failed, or never ran, has its
    claims ``failed``. A broken evidence file is reported and leaves the previous ledger in place."""
    from .claims import ClaimError, build_ledger

    try:
        df = build_ledger(results_dir, list_notebooks(root), profile)
    except (ClaimError, OSError, ValueError) as e:
        print(f"warning: claims ledger not written: {e}", file=sys.stderr, flush=True)
        return
    counts = df["verdict"].value_counts()
    print("claims ledger: " + ", ".join(f"{k} {int(v)}" for k, v in counts.items()) + f" ({len(df)} claims)",
          flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="run_all.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None, help=f"one of {PROFILES} (default: gpu if CUDA is available, else cpu)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this notebook (name with or without the NN_ prefix); repeatable")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override a parameter for every selected notebook that has it")
    ap.add_argument("--timeout", type=_positive_minutes, default=None, help="per-notebook time limit in minutes (> 0)")
    ap.add_argument("--results", default=None, help="results folder (default: <repo>/results)")
    ap.add_argument("--list", action="store_true", help="list notebooks and their profiles, then exit")
    ap.add_argument("--rebuild-site", action="store_true",
                    help="run nothing: rebuild the profile's claims ledger and results site from the results on disk")
    ap.add_argument("--data-root", default=None, metavar="DIR",
                    help=f"where the full profiles' datasets and weights are (${DATA_ROOT_ENV}; default /data)")
    ap.add_argument("--proof", action="store_true",
                    help="prove the full (or gpu) parameter sets end to end on the CPU in minutes: every run "
                         "stops after 2 optimizer updates (-p max_steps), each notebook's PROOF overrides apply "
                         "(devices, precision, batch, latency budgets), the data are synthetic copies of the "
                         "papers' (written once into --data-root, default $TOKENBOOK_CACHE/proof-data) and the "
                         "results go to results/proof/ (git-ignored)")
    args = ap.parse_args(argv)

    root = repo_root()
    notebooks = list_notebooks(root)
    if not notebooks:
        print(f"no notebooks found under {root / 'notebooks'}", file=sys.stderr)
        return 2
    if args.list:
        for n in notebooks:
            profs = sorted(p.stem for p in (root / "notebooks" / "params" / n).glob("*.yaml"))
            print(f"{n}: {', '.join(profs)}")
        return 0
    profile = args.profile
    if profile is None:
        import torch

        profile = "gpu" if torch.cuda.is_available() else "cpu"
    if profile not in PROFILES:
        print(f"error: unknown profile {profile!r}; choose one of {', '.join(PROFILES)}", file=sys.stderr)
        return 2
    selected = notebooks
    if args.only:
        selected = []
        for o in args.only:
            match = [n for n in notebooks if n == o or n.split("_", 1)[1] == o]
            if not match:
                print(f"error: no notebook {o!r}; available: {', '.join(notebooks)}", file=sys.stderr)
                return 2
            selected += [m for m in match if m not in selected]
    overrides_raw = {k: coerce(v) for k, v in args.param}
    results_dir = Path(args.results).resolve() if args.results else root / "results"
    if args.proof:
        if profile not in ("full", "gpu"):
            print(f"error: --proof proves the full and gpu parameter sets, not {profile!r}", file=sys.stderr)
            return 2
        if not args.results:
            results_dir = root / "results" / "proof"
        from .data.synthetic import default_proof_root, write_proof_data

        data_root = Path(args.data_root).expanduser() if args.data_root else default_proof_root()
        try:
            made = write_proof_data(data_root) + _proof_weights(selected, data_root)
        except (OSError, ValueError, RunnerError) as e:
            print(f"error: --proof data in {data_root}: {e}", file=sys.stderr)
            return 2
        print(f"proof data: {data_root}" + (f" (written now: {', '.join(made)})" if made else " (present)"),
              flush=True)
        os.environ[DATA_ROOT_ENV] = str(data_root)
        os.environ.setdefault("TOKENBOOK_RUNS", str(results_dir / ".runs"))  # proof runs stay out of the real store
    elif args.data_root:
        os.environ[DATA_ROOT_ENV] = str(Path(args.data_root).expanduser().resolve())
    timeout = args.timeout or DEFAULT_TIMEOUT_MIN[profile]
    if args.rebuild_site:
        problem = check_results_dir(results_dir)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        try:
            with ResultsLock(results_dir, profile):
                _write_ledger(results_dir, root, profile)
                written = write_index(results_dir, root, profile=profile, notebooks=notebooks)
        except LockHeld as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("rebuilt: " + ", ".join(_rel(p, root) for p in written.values()), flush=True)
        return 0

    # validate everything before running anything
    plans = []
    errors = []
    known: set[str] = set()
    for n in selected:
        try:
            cls = notebook_params(n, root)
            specs = cls.specs()
            known |= set(specs)
            ov = {k: v for k, v in overrides_raw.items() if k in specs}
            if args.proof:
                ov = {k: v for k, v in proof_overrides(cls, ov).items() if k in specs}
            params = resolve_parameters(root, n, profile, ov)
            plans.append((n, params))
        except (RunnerError, ValueError, FileNotFoundError) as e:
            errors.append(str(e))
            continue
        problem = check_dataset(params)  # before any kernel starts, not inside each one
        if problem:
            errors.append(f"{n}: dataset {params['dataset']!r}: {problem}")
    for k in overrides_raw:
        if k not in known and not errors:
            import difflib

            close = difflib.get_close_matches(k, sorted(known), 1)
            errors.append(f"-p {k}: no selected notebook has such a parameter"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not errors:
        problem = check_results_dir(results_dir)
        if problem:
            errors.append(problem)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        lock = ResultsLock(results_dir, profile).acquire()
    except LockHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run_all(root, plans, profile, results_dir, timeout, notebooks)
    finally:
        lock.release()


def _run_all(root: Path, plans: list, profile: str, results_dir: Path, timeout: float, notebooks: list[str]) -> int:
    print(f"tokenbook: running {len(plans)} notebook(s) with profile '{profile}' (limit {timeout:g} min each); "
          f"results in {results_dir}", flush=True)
    records = []
    interrupted = None
    for n, params in plans:
        print(f"--> {n} ...", flush=True)
        t0 = time.time()
        try:
            rec = run_notebook(root, n, profile, params, results_dir, timeout)
        except (KeyboardInterrupt, Terminated) as e:
            interrupted = 143 if isinstance(e, Terminated) else 130
            how = "SIGTERM" if interrupted == 143 else "Ctrl-C"
            records.append({"notebook": n, "profile": profile, "status": "interrupted",
                            "minutes": round((time.time() - t0) / 60, 2), "detail": f"stopped by {how}"})
            print(f"\n<-- {n}: interrupted ({how}); its staging folder was removed, previous results are kept",
                  flush=True)
            break
        records.append(rec)
        print(f"<-- {n}: {rec['status']} in {rec['minutes']:.2f} min" + (f" ({rec['detail']})" if rec["detail"] else ""),
              flush=True)
    # a second Ctrl-C while the index is written or the summary printed must not leave them half done
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if interrupted else None
    try:
        # only this profile's ledger and site (tokenbook.io.site_file): another profile's files are never touched
        _write_ledger(results_dir, root, profile)
        write_index(results_dir, root, profile=profile, notebooks=notebooks)
        print("\nsummary")
        print(f"{'notebook':28s} {'status':11s} {'minutes':>8s}")
        for r in records:
            print(f"{r['notebook']:28s} {r['status']:11s} {r['minutes']:8.2f}")
        for n, _ in plans[len(records):]:
            print(f"{n:28s} {'not run':11s} {'':>8s}")
        total = sum(r["minutes"] for r in records)
        print(f"{'total':28s} {'':11s} {total:8.2f}", flush=True)
    finally:
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)
    if interrupted:
        print(f"\ninterrupted: {len(plans) - len(records)} notebook(s) not run", file=sys.stderr)
        return interrupted
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} notebook(s) failed; their executed notebooks are in results/<name>/{profile}-failed/",
              file=sys.stderr)
        return 1
    return 0


def _on_sigterm(*_) -> None:
    raise Terminated()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)  # run the cleanup above on kill as well
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Terminated) as e:  # outside a notebook run (validation, index): no traceback
        print("\ninterrupted", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)

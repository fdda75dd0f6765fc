"""Results: atomic tables and figures with metadata, and paper-vs-ours tables.

A notebook opens one :class:`RunContext` (``RunContext.from_notebook(name, globals())``) which knows the notebook's
parameters, profile and output folder ``<results_root>/<notebook>/<profile>/``. ``ctx.save_table(name, df)`` writes
``<name>.csv`` and ``<name>.md``; ``ctx.save_figure(name, fig)`` writes ``<name>.png``; every write is atomic
(temporary file + rename) and updates ``meta.json`` (git commit and dirty flag, package versions, device, all
notebook parameters, seed, timings, tables and figures).

:func:`paper_vs_ours` joins our numbers with the paper's (``tokenbook.references``): one row per (model, metric) with
the paper value and its source, ours, the difference and, where a tolerance is defined, pass/fail. A paper value that
is not known is ``n/a``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pandas as pd

__all__ = ["RunContext", "paper_vs_ours", "save_table", "atomic_write", "environment_info", "git_info", "repo_root",
           "to_markdown", "NA"]

NA = "n/a"
PACKAGES = ("torch", "torchvision", "timm", "datasets", "lightning_fabric", "numpy", "pandas", "matplotlib",
            "papermill", "nbconvert", "tokenbook")


def repo_root(start: Optional[Path] = None) -> Path:
    """The workbook's root: ``$TOKENBOOK_ROOT``, else the first parent of ``start`` (or cwd) holding
    ``run_all.sh`` and ``notebooks/``, else cwd."""
    env = os.environ.get("TOKENBOOK_ROOT")
    if env:
        return Path(env).resolve()
    p = (start or Path.cwd()).resolve()
    for d in (p, *p.parents):
        if (d / "run_all.sh").is_file() and (d / "notebooks").is_dir():
            return d
    return p


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def git_info(root: Optional[Path] = None) -> dict:
    root = root or repo_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        # the code's state: results/ (which the runs themselves rewrite) does not make the tree dirty
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)results"], cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def environment_info() -> dict:
    """Versions, device and thread settings for the metadata."""
    from importlib import metadata

    import torch

    versions = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[p] = None
    dev = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        dev["gpu"] = torch.cuda.get_device_name(0)
        dev["gpu_count"] = torch.cuda.device_count()
        dev["cuda"] = torch.version.cuda
        dev["cudnn"] = torch.backends.cudnn.version()
    return {"versions": versions, "device": dev, "platform": platform.platform()}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return NA
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def to_markdown(df: pd.DataFrame, caption: str = "") -> str:
    """Markdown for a table: missing values shown as ``n/a``, numbers with 4 significant digits."""
    shown = df.copy()
    for c in shown.columns:
        shown[c] = [_fmt(v) for v in shown[c]]
    text = shown.to_markdown(index=False)
    return (f"{caption}\n\n" if caption else "") + text + "\n"


def save_table(df: pd.DataFrame, name: str, out_dir: Path, caption: str = "") -> dict:
    """Write ``<name>.csv`` and ``<name>.md`` atomically; return the entry recorded in meta.json."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / f"{name}.csv", df.to_csv(index=False))
    atomic_write(out_dir / f"{name}.md", to_markdown(df, caption))
    return {"name": name, "csv": f"{name}.csv", "md": f"{name}.md", "rows": len(df), "caption": caption}


class RunContext:
    """One notebook run: its parameters, output folder and metadata."""

    def __init__(self, notebook: str, profile: str, params: dict, results_root: str | Path = "results",
                 seed: Optional[int] = None):
        if not notebook or "/" in notebook:
            raise ValueError(f"bad notebook name {notebook!r}")
        self.notebook, self.profile, self.params = notebook, profile, dict(params)
        root = Path(results_root)
        if not root.is_absolute():
            root = repo_root() / root
        self.out_dir = root / notebook / profile
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed if seed is not None else params.get("seed")
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self.tables: dict[str, dict] = {}
        self.figures: dict[str, dict] = {}
        self.notes: dict[str, Any] = {}
        self._t: dict[str, float] = {}
        self._write_meta(status="running")

    @property
    def where(self) -> str:
        """The output folder for display: relative to the repository root, and the final location when the runner
        writes through a staging folder."""
        display = os.environ.get("TOKENBOOK_RESULTS_DISPLAY")
        if display:
            return f"{display}/{self.notebook}/{self.profile}"
        try:
            return str(self.out_dir.resolve().relative_to(repo_root()))
        except ValueError:
            return str(self.out_dir)

    # -- construction from a notebook ------------------------------------------------------------------------
    @classmethod
    def from_notebook(cls, notebook: str, namespace: dict, notebook_path: Optional[str | Path] = None) -> "RunContext":
        """Collect the values of the notebook's ``parameters`` cell from ``namespace`` (its ``globals()``), check
        their types against the cell's annotations, and open the run."""
        specs = notebook_parameters(notebook, notebook_path)
        params = {}
        for name, spec in specs.items():
            if name not in namespace:
                raise NameError(f"parameter {name!r} of {notebook} is not defined; run the parameters cell first")
            params[name] = check_param_type(name, namespace[name], spec["type"])
        if "profile" not in params or "results_root" not in params:
            raise ValueError(f"{notebook}: the parameters cell must define 'profile' and 'results_root'")
        return cls(notebook, params["profile"], params, params["results_root"], params.get("seed"))

    # -- writing ---------------------------------------------------------------------------------------------
    def save_table(self, name: str, df: pd.DataFrame, caption: str = "") -> pd.DataFrame:
        self.tables[name] = save_table(df, name, self.out_dir, caption)
        self._write_meta()
        return df

    def save_figure(self, name: str, fig, caption: str = "", dpi: int = 110) -> Path:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        path = atomic_write(self.out_dir / f"{name}.png", buf.getvalue())
        self.figures[name] = {"name": name, "png": path.name, "caption": caption}
        self._write_meta()
        return path

    def note(self, key: str, value: Any) -> None:
        """Record a scalar (e.g. a headline ratio) in meta.json."""
        self.notes[key] = value
        self._write_meta()

    class _Timer:
        def __init__(self, ctx, name):
            self.ctx, self.name = ctx, name

        def __enter__(self):
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            self.ctx.timings[self.name] = self.ctx.timings.get(self.name, 0.0) + time.perf_counter() - self.t0
            self.ctx._write_meta()

    def timer(self, name: str) -> "_Timer":
        """``with ctx.timer("training"): ...`` adds the elapsed seconds to meta.json's timings."""
        return RunContext._Timer(self, name)

    def finish(self) -> dict:
        """Mark the run complete in meta.json and return the metadata."""
        return self._write_meta(status="completed")

    def _write_meta(self, status: Optional[str] = None) -> dict:
        from .repro import repro_settings

        if status:
            self._status = status
        meta = {
            "notebook": self.notebook, "profile": self.profile, "status": getattr(self, "_status", "running"),
            "results_dir": self.where,
            "started_utc": _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc).isoformat(),
            "elapsed_s": time.time() - self.started, "seed": self.seed, "parameters": self.params,
            "timings_s": self.timings, "tables": list(self.tables.values()), "figures": list(self.figures.values()),
            "notes": self.notes, "git": git_info(), "repro": repro_settings(), **environment_info(),
        }
        atomic_write(self.out_dir / "meta.json", json.dumps(meta, indent=2, default=str))
        return meta


# ----------------------------------------------------------------------------------------------------------
# notebook parameters
# ----------------------------------------------------------------------------------------------------------
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _find_notebook(notebook: str, notebook_path: Optional[str | Path]) -> Path:
    if notebook_path:
        return Path(notebook_path)
    root = repo_root()
    for cand in (root / "notebooks" / f"{notebook}.ipynb", Path.cwd() / f"{notebook}.ipynb"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"cannot find {notebook}.ipynb under {root / 'notebooks'} or {Path.cwd()}")


def notebook_parameters(notebook: str, notebook_path: Optional[str | Path] = None) -> dict[str, dict]:
    """Name -> {type, default, help} of a notebook's ``parameters`` cell (via papermill's inspector)."""
    import papermill

    path = _find_notebook(notebook, notebook_path)
    info = papermill.inspect_notebook(str(path))
    if not info:
        raise ValueError(f"{path} has no cell tagged 'parameters'")
    return {k: {"type": v["inferred_type_name"], "default": v["default"], "help": v["help"]} for k, v in info.items()}


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(value: Any) -> Any:
    """A string holding a decimal number (``1e-3``, ``5E-4``, ``1e9``, ``.5``) as a float; anything else unchanged.

    YAML 1.1 (PyYAML) reads ``1e-3`` as a string (its float rule wants a dot and a signed exponent), so profile
    files and ``-p`` values would otherwise refuse scientific notation.
    """
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value.strip())
    return value


def check_param_type(name: str, value: Any, type_name: str) -> Any:
    """Check (and gently coerce) a parameter value against its annotation; clear error otherwise.

    float: ints and number strings in any notation (``1e-3``) are accepted as floats. int: a float or number string
    is accepted only when it is integral (``1e3`` -> 1000; ``1.5`` or ``1e-3`` are refused). bool is never a number.
    """
    t = _TYPES.get(type_name)
    if t is None:
        return value
    if t in (int, float):
        value = parse_number(value)
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is int and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise TypeError(f"parameter {name!r} must be int, got float {value!r} (not a whole number)")
    if t is int and isinstance(value, bool) or not isinstance(value, t):
        raise TypeError(f"parameter {name!r} must be {type_name}, got {type(value).__name__} {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# paper vs ours
# ----------------------------------------------------------------------------------------------------------
def paper_vs_ours(ours: pd.DataFrame, paper: str | Sequence[str], model_col: str = "model",
                  metrics: Optional[Sequence[str]] = None, label_col: Optional[str] = None) -> pd.DataFrame:
    """Long table: model, metric, paper value, its source, ours, difference, pass/fail.

    ``ours`` has one row per model and one column per metric (e.g. ``params_m``, ``gmacs``, ``top1``). Reference
    entries whose (model, metric) match are joined; metrics we measured without a paper value show ``n/a`` as the
    paper value, and reference entries we did not measure are listed with ``ours = n/a``.
    """
    from . import references

    papers = [paper] if isinstance(paper, str) else list(paper)
    refs = [r for p in papers for r in references.load(p)]
    metrics = list(metrics) if metrics is not None else [c for c in ours.columns if c not in (model_col, label_col)]
    rows, seen = [], set()
    for _, row in ours.iterrows():
        model = row[model_col]
        for m in metrics:
            if m not in row.index:
                continue
            v = row[m]
            v = None if v is None or (isinstance(v, float) and v != v) else v
            matches = [r for r in refs if r.model == model and r.metric == m] or [None]
            for r in matches:
                seen.add((model, m))
                diff = (v - r.value) if (r is not None and r.value is not None and v is not None) else None
                rows.append({
                    "model": model, **({label_col: row[label_col]} if label_col else {}), "metric": m,
                    "paper": r.value if r is not None else None, "ours": v, "diff": diff,
                    "rel_diff_pct": 100.0 * diff / r.value if diff is not None and r.value else None,
                    "unit": r.unit if r is not None else "", "pass": r.passes(v) if r is not None and v is not None else None,
                    "paper_source": f"{r.source} [{r.kind}]" if r is not None else NA,
                })
    models = set(ours[model_col])
    for r in refs:
        if r.model in models and r.metric in metrics and (r.model, r.metric) not in seen:
            rows.append({"model": r.model, "metric": r.metric, "paper": r.value, "ours": None, "diff": None,
                         "rel_diff_pct": None, "unit": r.unit, "pass": None, "paper_source": f"{r.source} [{r.kind}]"})
    return pd.DataFrame(rows)


def reference_table(paper: str, models: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """The paper's numbers as a table (for 'paper only' columns such as ImageNet top-1 we do not reproduce)."""
    from . import references

    df = references.as_frame(paper)
    if models is not None:
        df = df[df["model"].isin(list(models))]
    return df[["model", "metric", "value", "unit", "source", "kind"]].rename(columns={"value": "paper"})

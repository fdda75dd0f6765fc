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
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

# the leaf I/O module; re-exported here for the notebooks and older callers
from .io import NA, PASS_COLUMNS, atomic_write, display_path, format_value, formatted, repo_root, to_markdown  # noqa: F401
from .repro import cpu_model as _cpu_model  # the float environment's CPU (one definition, in repro)

__all__ = ["RunContext", "paper_vs_ours", "save_table", "atomic_write", "environment_info", "git_info", "run_git_info", "repo_root",
           "to_markdown", "NA", "format_value", "formatted", "style_table", "show_table", "display_path", "swap_in",
           "parameter_range", "check_param_range"]

#: where a notebook run outside the runner writes (git-ignored): results/<notebook>/interactive/
INTERACTIVE_FOLDER = "interactive"
PACKAGES = ("torch", "torchvision", "timm", "datasets", "lightning_fabric", "numpy", "pandas", "matplotlib",
            "papermill", "nbconvert", "tokenbook")


class SavedFile(type(Path())):
    """The path of a file a run saved. Shown as nothing in a notebook (a cell that ends with ``ctx.save_figure(...)``
    must not print the staging path into the report); otherwise an ordinary ``Path``."""

    def _ipython_display_(self) -> None:
        pass


def swap_in(src: Path, dst: Path) -> None:
    """Replace the folder ``dst`` by ``src`` (a finished staging folder) with renames only: readers see the old
    complete folder or the new complete one, never a half-written mix."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def run_git_info(start: dict, now: dict) -> dict:
    """The ``git`` record of a run's ``meta.json``: the commit the run started from, and ``dirty`` when the tree was
    dirty at the start or is now, or when HEAD moved during the run (a commit or a checkout while a long run went on
    would otherwise stamp its results with code that did not produce them; ``commit_now`` then names the new HEAD)."""
    out = {"commit": start.get("commit"), "dirty": start.get("dirty")}
    if now.get("commit") != start.get("commit"):
        out["dirty"], out["commit_now"] = True, now.get("commit")
    elif now.get("dirty") and out["dirty"] is not None:
        out["dirty"] = True
    return out


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
    dev = {"cpu": platform.processor() or platform.machine(), **_cpu_model(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        dev["gpu"] = torch.cuda.get_device_name(0)
        dev["gpu_count"] = torch.cuda.device_count()
        dev["cuda"] = torch.version.cuda
        dev["cudnn"] = torch.backends.cudnn.version()
    return {"versions": versions, "device": dev, "platform": platform.platform()}


#: columns whose text is long (sources, notes): wrapped in reports, never cut
WRAP_HINTS = ("source", "note", "notes", "detail", "why", "what", "reason", "statement", "caption", "setting")


_TABLE_CSS = [
    {"selector": "", "props": "border-collapse: collapse; font-size: 0.85em; margin: 0.4em 0 1.2em 0;"},
    {"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: 600; padding: 0 0 0.4em 0; "
                                     "color: #333; max-width: 70em;"},
    {"selector": "th", "props": "text-align: left; padding: 3px 8px; border-bottom: 1px solid #999; "
                                "background: #f4f4f4; white-space: normal; vertical-align: bottom;"},
    {"selector": "td", "props": "padding: 3px 8px; border-bottom: 1px solid #e4e4e4; vertical-align: top;"},
]


def style_table(df: pd.DataFrame, caption: str = ""):
    """The one display form of a table for people (pandas ``Styler``): no index column, the caption above,
    cells formatted by :func:`format_value` (``n/a`` for missing values, thousands separators, 4 significant
    digits), ``pass`` as a green ✓ / red ✗, numbers right-aligned, long text (sources, notes) wrapped, never cut."""
    df = df.reset_index(drop=True)
    st = df.style.hide(axis="index")
    st = st.format({c: (lambda v, _c=str(c): format_value(v, _c)) for c in df.columns})
    if caption:
        st = st.set_caption(caption)
    st = st.set_table_styles(_TABLE_CSS)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    if numeric:
        st = st.set_properties(subset=numeric, **{"text-align": "right", "white-space": "nowrap"})
    text = [c for c in df.columns if c not in numeric]
    if text:
        st = st.set_properties(subset=text, **{"text-align": "left"})
    wrap = [c for c in df.columns if any(h in str(c).lower() for h in WRAP_HINTS)]
    if wrap:
        st = st.set_properties(subset=wrap, **{"white-space": "normal", "min-width": "12em", "max-width": "36em",
                                               "overflow-wrap": "anywhere"})
    for c in df.columns:
        if str(c) in PASS_COLUMNS:
            st = st.map(lambda v: ("color: #1a7f37; font-weight: 700;" if v is True or v is np.True_ else
                                   "color: #cf222e; font-weight: 700;" if v is False or v is np.False_ else ""),
                        subset=[c])
    return st


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def show_table(df: Any, caption: str = "") -> None:
    """Display ``df`` in the notebook as :func:`style_table` formats it (outside a kernel: print its Markdown).
    A Series or a dict is shown as a one-row table; anything else is passed to IPython's ``display``."""
    if isinstance(df, pd.Series):
        df = df.to_frame().T if df.name is None else df.to_frame()
    elif isinstance(df, dict):
        df = pd.DataFrame([df])
    if not isinstance(df, pd.DataFrame):
        if _in_kernel():
            from IPython.display import display

            display(df)
        else:
            print(df)
        return
    if _in_kernel():
        from IPython.display import display

        display(style_table(df, caption))
    else:
        print(to_markdown(df, caption))


def save_table(df: pd.DataFrame, name: str, out_dir: Path, caption: str = "") -> dict:
    """Write ``<name>.csv`` and ``<name>.md`` atomically; return the entry recorded in meta.json."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / f"{name}.csv", df.to_csv(index=False))
    atomic_write(out_dir / f"{name}.md", to_markdown(df, caption))
    return {"name": name, "csv": f"{name}.csv", "md": f"{name}.md", "rows": len(df), "caption": caption}


class RunContext:
    """One notebook run: its parameters, output folder and metadata."""

    def __init__(self, notebook: str, profile: str, params: dict, results_root: str | Path = "results",
                 seed: Optional[int] = None, folder: Optional[str] = None, stage: bool = False):
        """Results go to ``<results_root>/<notebook>/<folder>/`` (``folder`` defaults to the profile). With
        ``stage=True`` they are written to ``<results_root>/.staging/...`` first and swapped in by :meth:`finish`
        (what the runner does for every run), so an unfinished or failed run never touches earlier results."""
        if not notebook or "/" in notebook:
            raise ValueError(f"bad notebook name {notebook!r}")
        self.notebook, self.profile, self.params = notebook, profile, dict(params)
        root = Path(results_root)
        if not root.is_absolute():
            root = repo_root() / root
        self.folder = folder or profile
        if not self.folder or "/" in self.folder:
            raise ValueError(f"bad results folder {self.folder!r}")
        self.final_dir = root / notebook / self.folder
        self._stage_root: Optional[Path] = None
        if stage:
            import shutil

            self._stage_root = root / ".staging" / f"{notebook}-{self.folder}-{os.getpid()}"
            shutil.rmtree(self._stage_root, ignore_errors=True)
            self.out_dir = self._stage_root / notebook / self.folder
        else:
            self.out_dir = self.final_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed if seed is not None else params.get("seed")
        self.started = time.time()
        self._git_start = git_info()  # the code that runs is the code at the start (see run_git_info)
        self.timings: dict[str, float] = {}
        self.tables: dict[str, dict] = {}
        self.figures: dict[str, dict] = {}
        self.notes: dict[str, Any] = {}
        self._t: dict[str, float] = {}
        self._captions: dict[int, str] = {}
        self.evidence: dict[str, Any] = {}
        self._write_meta(status="running")

    @property
    def where(self) -> str:
        """The output folder for display: relative to the repository root, and the final location when the runner
        writes through a staging folder."""
        display = os.environ.get("TOKENBOOK_RESULTS_DISPLAY")
        if display:
            return f"{display}/{self.notebook}/{self.folder}"
        return display_path(self.final_dir)

    # -- construction from a notebook ------------------------------------------------------------------------
    @classmethod
    def from_notebook(cls, notebook: str, namespace: dict, notebook_path: Optional[str | Path] = None) -> "RunContext":
        """Open the run of ``notebook`` with its parameters: its :class:`tokenbook.params.Params` (``p =
        exp.Params.from_namespace(globals())``), or a namespace (``globals()``) whose values of the ``parameters``
        cell are checked against the cell's annotations."""
        from .params import Params

        if isinstance(namespace, Params):
            params = namespace.to_dict()
        else:
            specs = notebook_parameters(notebook, notebook_path)
            params = {}
            for name, spec in specs.items():
                if name not in namespace:
                    raise NameError(f"parameter {name!r} of {notebook} is not defined; run the parameters cell first")
                params[name] = check_param_type(name, namespace[name], spec["type"])
        if "profile" not in params or "results_root" not in params:
            raise ValueError(f"{notebook}: the parameters cell must define 'profile' and 'results_root'")
        if os.environ.get("TOKENBOOK_HEADLESS") == "1":  # the runner: it stages and swaps in itself
            return cls(notebook, params["profile"], params, params["results_root"], params.get("seed"))
        # run outside the runner (JupyterLab, nbclient, papermill by hand): a git-ignored scratch folder, staged,
        # so that exploring never rewrites the committed results; TOKENBOOK_RESULTS_FOLDER names another folder
        folder = os.environ.get("TOKENBOOK_RESULTS_FOLDER") or INTERACTIVE_FOLDER
        return cls(notebook, params["profile"], params, params["results_root"], params.get("seed"), folder=folder,
                   stage=True)

    # -- writing ---------------------------------------------------------------------------------------------
    def save_table(self, name: str, df: pd.DataFrame, caption: str = "", headline: bool = False) -> pd.DataFrame:
        """Write ``<name>.csv`` (raw values) and ``<name>.md`` (formatted); ``headline=True`` puts the table's
        rows in the results site's headline table. :meth:`show` displays it later with this caption."""
        self.tables[name] = save_table(df, name, self.out_dir, caption)
        if headline:
            self.tables[name]["headline"] = True
        self._captions[id(df)] = caption
        self._write_meta()
        return df

    def show(self, *tables: pd.DataFrame, caption: Optional[str] = None) -> None:
        """Display tables for people (:func:`style_table`), each with the caption it was saved with."""
        for df in tables:
            show_table(df, self._captions.get(id(df), "") if caption is None else caption)

    def save_figure(self, name: str, fig, caption: str = "", dpi: int = 110, key: bool = False) -> Path:
        """Write ``<name>.png`` and, in a notebook kernel, show that same PNG inline with its caption (and close the
        figure, so it is not drawn twice): the executed notebook and its HTML report carry every saved figure.
        ``key=True`` makes it the report's key figure, the thumbnail on the landing page (default: the first one)."""
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        path = SavedFile(atomic_write(self.out_dir / f"{name}.png", buf.getvalue()))
        self.figures[name] = {"name": name, "png": path.name, "caption": caption, **({"key": True} if key else {})}
        self._write_meta()
        if _in_kernel():
            import matplotlib.pyplot as plt
            from IPython.display import Image, Markdown, display

            display(Image(data=buf.getvalue(), format="png"))
            if caption:
                display(Markdown(f"*Figure ({name}): {caption}*"))
            plt.close(fig)
        return path

    def add_evidence(self, *evidence) -> None:
        """Record :class:`tokenbook.claims.Evidence` for claims of this notebook's paper: written (atomically, every
        call) to ``claims_evidence.json`` beside the tables; the runner's claims ledger reads it. A claim id given
        twice keeps the last evidence."""
        from .claims import Evidence, write_evidence

        for e in evidence:
            if not isinstance(e, Evidence):
                raise TypeError(f"add_evidence takes tokenbook.claims.Evidence, got {type(e).__name__}")
            self.evidence[e.claim] = e
        write_evidence(self.out_dir, self.evidence.values())

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
        """Mark the run complete in meta.json, swap a staged run into place, and return the metadata."""
        meta = self._write_meta(status="completed")
        if self._stage_root is not None:
            import shutil

            swap_in(self.out_dir, self.final_dir)
            shutil.rmtree(self._stage_root, ignore_errors=True)
            try:
                self._stage_root.parent.rmdir()
            except OSError:
                pass
            self.out_dir, self._stage_root = self.final_dir, None
        return meta

    def _write_meta(self, status: Optional[str] = None) -> dict:
        from .repro import repro_settings

        if status:
            self._status = status
        meta = {
            "notebook": self.notebook, "profile": self.profile, "status": getattr(self, "_status", "running"),
            "results_dir": self.where, "folder": self.folder,
            "started_utc": _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc).isoformat(),
            "elapsed_s": time.time() - self.started, "seed": self.seed, "parameters": self.params,
            "timings_s": self.timings, "tables": list(self.tables.values()), "figures": list(self.figures.values()),
            "notes": self.notes, "git": run_git_info(self._git_start, git_info()), "repro": repro_settings(),
            **environment_info(),
        }
        atomic_write(self.out_dir / "meta.json", json.dumps(meta, indent=2, default=str))
        return meta


# ----------------------------------------------------------------------------------------------------------
# notebook parameters
# ----------------------------------------------------------------------------------------------------------


from .params import check_param_range, check_param_type, parameter_range, parse_number  # noqa: E402,F401


def _find_notebook(notebook: str, notebook_path: Optional[str | Path]) -> Path:
    if notebook_path:
        return Path(notebook_path)
    root = repo_root()
    for cand in (root / "notebooks" / f"{notebook}.ipynb", Path.cwd() / f"{notebook}.ipynb"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"cannot find {notebook}.ipynb under {root / 'notebooks'} or {Path.cwd()}")


def notebook_parameters(notebook: str, notebook_path: Optional[str | Path] = None) -> dict[str, dict]:
    """Name -> {type, default, help} of a notebook's ``parameters`` cell (via papermill's inspector). A number's
    comment may end with its range (``[1, inf)``, ``[0, 1)``): :func:`parameter_range`, checked by the runner."""
    import papermill

    path = _find_notebook(notebook, notebook_path)
    info = papermill.inspect_notebook(str(path))
    if not info:
        raise ValueError(f"{path} has no cell tagged 'parameters'")
    return {k: {"type": v["inferred_type_name"], "default": v["default"], "help": v["help"]} for k, v in info.items()}


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

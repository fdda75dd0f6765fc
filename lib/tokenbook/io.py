"""The leaf I/O helpers of the shared core: atomic file writes and the one text form of a table cell.

Imports no other tokenbook module (``tests/test_layout.py`` checks that the package's import graph has no cycle), so
every other module may use it: :mod:`tokenbook.results` re-exports :func:`atomic_write`, :func:`to_markdown`,
:func:`format_value` and :func:`formatted` for the notebooks.

- :func:`atomic_write`: a temporary file in the target folder, fsync, then an atomic rename; the file gets the mode
  the process's umask implies (``0666 & ~umask``, as ``open()`` would give), not ``mkstemp``'s 0600.
- :func:`format_value` / :func:`formatted` / :func:`to_markdown`: how a cell is shown to people (``n/a`` for
  missing, ✓ / ✗, thousands separators, 4 significant digits), shared by the reports, the notebooks and the
  Markdown files.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["repo_root", "NA", "PASS_COLUMNS", "SITE_PROFILE", "site_file", "atomic_write", "atomic_save", "cache_root", "file_mode", "format_value",
           "formatted", "to_markdown"]

NA = "n/a"
#: columns shown as a check mark / cross (a tolerance test against the paper)
PASS_COLUMNS = ("pass",)


#: the profile whose site files are committed and carry the plain names (``results/index.html``, ...)
SITE_PROFILE = "cpu"


def site_file(name: str, profile: str) -> str:
    """The name of a results-site file of ``profile``: every profile owns its own ledger, landing page, README and
    forest plot, so that a run of one profile never rewrites another's. The committed profile (``cpu``) keeps the
    plain names (``index.html``, ``README.md``, ``claims.csv``, ``CLAIMS.md``, ``forest.png``, ``forest.csv``);
    another profile ``p`` gets ``<stem>-<p><suffix>`` (``index-smoke.html``, ``claims-gpu.csv``, ...)."""
    if not profile or "/" in profile or profile.startswith("."):
        raise ValueError(f"bad profile name {profile!r}")
    if profile == SITE_PROFILE:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{profile}{dot}{suffix}"


def file_mode() -> int:
    """The permission bits a new file gets under the current umask (``0o666 & ~umask``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def cache_root() -> Path:
    """The workbook's cache folder: ``$TOKENBOOK_CACHE``, else ``~/.cache/tokenbook``."""
    return Path(os.environ.get("TOKENBOOK_CACHE") or Path.home() / ".cache" / "tokenbook").expanduser()


def repo_root(start: "Path | None" = None) -> Path:
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


def atomic_save(path: Path, save: "Any") -> Path:
    """``save(tmp)`` writes a file (``torch.save``, ``np.savez``, ...) next to ``path``; it is then renamed into
    place, so ``path`` is never half written. A failed ``save`` leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename; the file's mode
    is the one the umask implies (:func:`file_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
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


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v)) if not isinstance(v, (list, tuple, dict, set)) else False
    except (TypeError, ValueError):
        return False


def format_value(v: Any, column: str = "") -> str:
    """How a table cell is shown to people (reports, notebooks, results/README.md; CSVs keep raw values).

    - missing (None, NaN, NA) -> ``n/a``, the project's one word for "not stated / not measured";
    - ``pass`` columns: True/False -> ``✓`` / ``✗``;
    - integers and integral floats >= 1,000 -> thousands separators (``22,050,660``), never scientific notation;
    - other floats -> 4 significant digits (``0.1235``, ``76.85``), large ones without decimals (``12,346``).
    """
    if _missing(v):
        return NA
    if column in PASS_COLUMNS and isinstance(v, (bool, np.bool_)):
        return "✓" if v else "✗"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != v:
            return NA
        if v in (float("inf"), float("-inf")):
            return "∞" if v > 0 else "-∞"
        if abs(v) >= 1e4 or (v.is_integer() and abs(v) >= 1000):
            return f"{v:,.0f}"
        if v.is_integer():
            return f"{int(v)}"
        if abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with every cell as the text :func:`format_value` shows."""
    shown = df.copy()
    for c in shown.columns:
        shown[c] = [format_value(v, str(c)) for v in df[c]]
    return shown


def to_markdown(df: pd.DataFrame, caption: str = "") -> str:
    """Markdown for a table, formatted as in the reports (:func:`format_value`), caption above."""
    text = formatted(df).to_markdown(index=False)
    return (f"{caption}\n\n" if caption else "") + text + "\n"


def display_path(path: Any, root: "Path | None" = None) -> str:
    """A path as reports show it: relative to the repository root, else under ``~``, never the machine's absolute
    path of a home folder."""
    p = Path(path).expanduser()
    try:
        return str(p.resolve().relative_to((root or repo_root()).resolve()))
    except ValueError:
        pass
    try:
        return "~/" + str(p.resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(p)
